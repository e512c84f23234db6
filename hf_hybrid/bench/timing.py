"""Timing one loaded model: prefill and full ``generate`` calls, and hf_hybrid's lane counters."""

from __future__ import annotations

import math
import time
from typing import Any

import torch


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _pad_id(model: Any) -> int:
    config = getattr(model, "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def random_prompt(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """``batch`` x ``length`` random token ids below ``vocab``, the same for the same ``seed``."""
    gen = torch.Generator().manual_seed(seed + 12345)
    return torch.randint(0, vocab, (batch, length), generator=gen)


class DecodeClock:
    """A ``generate`` streamer that timestamps every token it is handed (after a device sync), so a call's
    decode steps are timed inside the call: from its first new token (the prefill's) to its last."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        """Called by ``generate`` with the prompt (some versions) and with each step's new tokens."""
        _sync()
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        """Called by ``generate`` when it is done."""

    def decode_s(self, new_tokens: int) -> float | None:
        """Seconds of the last ``new_tokens - 1`` steps (None when fewer tokens were handed over)."""
        if new_tokens < 2 or len(self.stamps) < new_tokens:
            return None
        return self.stamps[-1] - self.stamps[-new_tokens]


def measure_generate(model: Any, input_ids: torch.Tensor, new_tokens: int, repeats: int = 1) -> dict:
    """Time prefill (1 new token) and a full ``new_tokens`` generation after one warm-up call.

    The warm-up runs the full prompt with 2 new tokens, so shape-dependent first-call costs (allocations,
    kernel selection, lazy initialisation) of both the prefill and the decode path are paid before the
    clock starts. Decode is timed inside the full call, between its first and last new token
    (:class:`DecodeClock`); ``decode_tok_s_by_difference`` keeps the earlier figure, full call minus the
    separate prefill call, which a prefill timed slower or faster than the full call's own shifts (by up to
    ~10% on S3 on the H200 machine, where decode is short). With ``repeats`` > 1 the fastest of each timing
    is kept. Returns seconds and rates; ``decode_tok_s`` is ``None`` when ``new_tokens`` is 1 or the decode
    time is below the timer's resolution.
    """
    batch, prompt = input_ids.shape
    pad = _pad_id(model)

    def generate(ids: torch.Tensor, count: int, streamer=None) -> tuple[float, torch.Tensor]:
        mask = torch.ones_like(ids)
        _sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=count,
                min_new_tokens=count,
                do_sample=False,
                pad_token_id=pad,
                streamer=streamer,
            )
        _sync()
        return time.perf_counter() - start, out

    generate(input_ids, min(2, new_tokens))  # warm-up
    t_prefill = t_full = t_decode = math.inf
    out = None
    for _ in range(max(1, repeats)):
        t_prefill = min(t_prefill, generate(input_ids, 1)[0])
        if new_tokens > 1:
            clock = DecodeClock()
            elapsed, out = generate(input_ids, new_tokens, clock)
            t_full = min(t_full, elapsed)
            inside = clock.decode_s(new_tokens)
            t_decode = min(t_decode, inside if inside is not None else elapsed - t_prefill)
    if new_tokens <= 1:
        t_full = t_prefill
    produced = int(out.shape[1] - prompt) if out is not None else 1
    steps = new_tokens - 1

    def rate(seconds: float) -> float | None:
        return batch * steps / seconds if new_tokens > 1 and seconds > 1e-6 else None

    return {
        "prefill_s": t_prefill,
        "full_s": t_full,
        "prefill_tok_s": prompt * batch / t_prefill if t_prefill > 0 else None,
        "decode_tok_s": rate(t_decode),
        "decode_tok_s_by_difference": rate(t_full - t_prefill),
        "decode_step_s": t_decode / steps if new_tokens > 1 else None,
        "e2e_s": t_full,
        "generated_tokens": produced,
    }


def lane_stats(model: Any) -> dict | None:
    """The executor's counters summed over the measurement calls, with the CPU lane's achieved weight rate."""
    executor = getattr(getattr(model, "hybrid", None), "executor", None)
    stats = getattr(executor, "stats", None)
    if stats is None:
        return None
    out = {name: getattr(stats, name) for name in stats.__dataclass_fields__}
    out["cpu_lane_GBps"] = stats.cpu_bytes / stats.cpu_lane_s / 1e9 if stats.cpu_lane_s else None
    # predict_next_layer's guesses that the next layer's step routed tokens to (the "predict" variant)
    out["guess_rate"] = stats.guessed_right / stats.guessed_experts if stats.guessed_experts else None
    # the serial host path: mean time between one layer step and the next, and issuing inside a step
    out["host_gap_ms_per_layer"] = 1e3 * stats.host_gap_s / stats.host_gaps if stats.host_gaps else None
    out["issue_ms_per_layer"] = 1e3 * stats.issue_s / stats.groups if stats.groups else None
    # one streamed expert of a decode step on the feeding thread: in all, and its staging fetch alone
    issues = stats.stream_issues
    out["stream_issue_us"] = 1e6 * stats.stream_issue_s / issues if issues else None
    out["stream_fetch_us"] = 1e6 * stats.stream_fetch_s / issues if issues else None
    out["cpu_scale"] = getattr(executor, "cpu_scale", None)
    out["cpu_scales"] = dict(getattr(executor, "cpu_scales", {}))
    # the feeding thread's learned time to issue one GPU-lane expert of a decode step, against the profile's
    out["issue_us"] = {k: 1e6 * v for k, v in getattr(executor, "issue_seconds", {}).items()}
    # ... and of one expert of a prefill-sized step (issued kernel by kernel, with its tokens' gathers)
    out["prefill_issue_us"] = {k: 1e6 * v for k, v in getattr(executor, "prefill_issue_seconds", {}).items()}
    graphs = getattr(model.hybrid, "decode_graphs", None)
    # cumulative since load: layer steps that took the split decode path, and replayed a CUDA graph
    out["decode_graph_steps"] = graphs.steps if graphs is not None else 0
    out["decode_graph_replays"] = graphs.replays if graphs is not None else 0
    out["decode_graph_router_hits"] = graphs.router_hits if graphs is not None else 0
    experts = getattr(executor, "expert_graphs", None)
    # cumulative since load: GPU-lane experts of one-token steps replayed as CUDA graphs, graphs recorded
    out["expert_graph_replays"] = experts.replays if experts is not None else 0
    out["expert_graph_captures"] = experts.captures if experts is not None else 0
    return out
