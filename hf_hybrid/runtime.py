"""What a loaded hybrid model carries: its runtime (plan, executor, hooks, lock) and the methods mixed into
its own class -- a ``generate`` guarded against ``max_context`` and serialised per model, ``calibrate``,
``trace`` and refusals of what a placed model cannot do (``to``, ``save_pretrained``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from transformers.utils import logging

from .errors import ContextLengthError
from .executor import Executor
from .hooks import detach
from .loading import LoadedModel
from .planner import HybridPlan, plan
from .units import GPU

logger = logging.get_logger(__name__)


def experts_per_token(config) -> int:
    """Experts each token is routed to (``num_experts_per_tok``; 2 when the config does not say)."""
    return int(getattr(config, "num_experts_per_tok", 0) or 2)


@dataclass
class HybridRuntime:
    """Everything hf_hybrid attaches to a model: plan, executor, loaded groups and hook handles."""

    plan: HybridPlan
    executor: Executor
    loaded: LoadedModel
    handles: list
    max_context: int
    max_batch_size: int
    source: str
    lock: threading.RLock = field(default_factory=threading.RLock)

    def close(self) -> None:
        """Stop the CPU worker, remove hooks and release staging and pinned buffers."""
        detach(self.handles)
        self.handles = []
        self.executor.close()


class HybridGenerationMixin:
    """Mixed into the model's own class: a guarded ``generate`` and the hybrid accessors."""

    hybrid: HybridRuntime

    @property
    def hybrid_plan(self) -> HybridPlan:
        """The placement this model runs with (``print`` it for a table)."""
        return self.hybrid.plan

    @property
    def device(self) -> torch.device:
        """The accelerator the model computes on (inputs go here), whatever the first parameter's home."""
        return self.hybrid.executor.device

    def generate(self, *args, **kwargs):
        """transformers ``generate``, checked against ``max_context`` and serialised per model.

        A failed or interrupted call (an exception in a lane, CUDA OOM, Ctrl-C) resets the executor's
        lanes before the error propagates, so the model stays usable.
        """
        self._check_context(args, kwargs)
        with self.hybrid.lock:
            starts: list[float] = []  # host time at the start of each forward: prefill, then decode steps
            handle = self.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
            try:
                out = super().generate(*args, **kwargs)
            except BaseException:
                self.hybrid.executor.recover()
                raise
            finally:
                handle.remove()
            self._record_throughput(args, kwargs, starts, time.perf_counter())
            return out

    def _record_throughput(self, args, kwargs, starts: list[float], finished: float) -> None:
        """Put what this generate call measured beside the plan's predictions (``hybrid_plan.measured``).

        generate waits for each step's token on the host, so the start of forward k + 1 marks the end of
        forward k: prefill = second start - first start, decode = the rest, without extra device syncs.
        """
        input_ids = self._input_ids(args, kwargs)
        if input_ids is None or input_ids.dim() != 2 or not starts:
            return
        batch, prompt = input_ids.shape
        prefill_s = (starts[1] if len(starts) > 1 else finished) - starts[0]
        measured = {
            "prompt_tokens": prompt,
            "batch": batch,
            "prefill_tok_s": batch * prompt / max(prefill_s, 1e-9),
        }
        steps = len(starts) - 1
        if steps > 0:
            measured["decode_steps"] = steps
            measured["decode_tok_s"] = batch * steps / max(finished - starts[1], 1e-9)
        self.hybrid.plan.measured = measured

    @staticmethod
    def _input_ids(args, kwargs):
        """The prompt tensor of a ``generate(*args, **kwargs)`` call (``None`` when it is not a tensor)."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            input_ids = kwargs.get("inputs")
        return input_ids if isinstance(input_ids, torch.Tensor) else None

    def _check_context(self, args, kwargs) -> None:
        input_ids = self._input_ids(args, kwargs)
        if input_ids is None:
            return
        prompt = input_ids.shape[-1]
        rows = input_ids.shape[0] if input_ids.dim() > 1 else 1
        gen_config = kwargs.get("generation_config") or self.generation_config

        def setting(name: str, default):
            value = kwargs.get(name, getattr(gen_config, name, None))
            return default if value is None else value

        new, max_length = setting("max_new_tokens", None), setting("max_length", None)
        if new is not None:
            total = prompt + new
        elif max_length is not None:
            total = max_length
        else:
            # transformers generates 20 new tokens when neither limit is given
            total = prompt + 20
            positions = getattr(self.config, "max_position_embeddings", None)
            total = min(total, positions) if positions else total
        # beams and returned sequences each hold their own KV cache rows
        batch = rows * max(setting("num_beams", 1), setting("num_return_sequences", 1))
        rt = self.hybrid
        if total > rt.max_context:
            raise ContextLengthError(
                f"this call needs {total} positions (prompt {prompt} + new tokens) but the KV cache was reserved "
                f"for max_context={rt.max_context}. Lower max_new_tokens, or reload with a larger max_context."
            )
        if batch > rt.max_batch_size:
            raise ContextLengthError(
                f"batch of {batch} sequences exceeds max_batch_size={rt.max_batch_size} the KV cache was "
                f"reserved for; reload with max_batch_size={batch}."
            )

    def calibrate(
        self,
        texts,
        tokenizer=None,
        *,
        max_length: int = 512,
        replan: bool = True,
    ) -> dict[str, float]:
        """Record how often each expert is routed to on ``texts`` and re-plan placement with it.

        ``texts`` are strings (tokenised with ``tokenizer``, by default the checkpoint's own) or token-id
        tensors. Returns ``{"layers.3.experts.5": frequency}`` where a frequency is the share of tokens
        routed to that expert (each layer's frequencies sum to top-k). With ``replan`` the experts are
        moved to the homes a plan with these frequencies gives (hot experts onto the GPU); attention and
        other modules keep their homes. Pass the returned dict as ``routing_stats=`` to a later
        ``from_pretrained`` to plan with it from the start.
        """
        rt = self.hybrid
        if not any(g.routed for g in rt.loaded.groups.values()):
            raise ValueError("calibrate() needs a mixture-of-experts model: this one has no routed experts")
        if isinstance(texts, (str, torch.Tensor)):
            texts = [texts]
        if any(isinstance(t, str) for t in texts) and tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(rt.source)
        ex = rt.executor
        with rt.lock:
            ex.routed_counts.clear()
            ex.routed_tokens.clear()
            ex.record_routing = True
            try:
                with torch.no_grad():
                    for text in texts:
                        if isinstance(text, str):
                            encoded = tokenizer(
                                text, return_tensors="pt", truncation=True, max_length=max_length
                            )
                            ids = encoded["input_ids"]
                        else:
                            ids = text if text.dim() == 2 else text.unsqueeze(0)
                        ids = ids[:, : min(max_length, rt.max_context)]
                        self(ids.to(self.device), use_cache=False)
            except BaseException:
                ex.recover()
                raise
            finally:
                ex.record_routing = False
            stats = {}
            for group in rt.loaded.groups.values():
                if group.routed:
                    seen = max(1, ex.routed_tokens.get(group.layer, 0))
                    for i, u in enumerate(group.units):
                        stats[u.name] = ex.routed_counts.get((group.layer, i), 0) / seen
            if replan:
                self._replan_experts(stats)
        return stats

    def _replan_experts(self, routing: dict[str, float]) -> None:
        """Re-plan with ``routing`` keeping every non-expert unit's home, then move the experts."""
        rt = self.hybrid
        old = rt.plan
        keep = {u.name: old.homes[u.name] for u in old.units if u.kind != "expert" and len(u.homes) > 1}
        new = plan(
            old.units,
            old.profile,
            old.budget_bytes,
            kv_cache_bytes=old.kv_cache_bytes,
            workspace_bytes=old.workspace_bytes,
            workload=old.workload,
            top_k=experts_per_token(self.config),
            forced=keep,
            routing=routing,
            token_assignment=old.token_assignment,
        )
        ex = rt.executor
        moves = [(g, i, new.homes[u.name]) for g in rt.loaded.groups.values() for i, u in enumerate(g.units)]
        # free device memory before taking more: units leaving the GPU move first
        for group, i, home in sorted(moves, key=lambda m: m[2] == GPU):
            ex.rehome(group, i, home)
        ex.prepare_cpu_kernels(rt.loaded.groups.values(), progress=False)
        rt.plan = new
        logger.info("hf_hybrid: re-planned with calibrated routing: %s", new.predicted)

    def trace(
        self, path, input_ids: torch.Tensor | None = None, *, max_new_tokens: int = 8, **generate_kwargs
    ):
        """Run one prefill and ``max_new_tokens - 1`` decode steps and save a Chrome/Perfetto timeline.

        The trace has one row per lane -- the feeding thread ("host"), the CPU lane, PCIe copies and GPU
        compute -- so you can see which lane bounds each layer. Open it at https://ui.perfetto.dev.
        ``input_ids`` defaults to a random prompt of the planned workload's length. Returns the path.
        """
        from .trace import Tracer

        rt = self.hybrid
        if input_ids is None:
            length = min(rt.plan.workload.prompt_tokens, rt.max_context - max_new_tokens)
            generator = torch.Generator().manual_seed(0)
            input_ids = torch.randint(0, self.config.vocab_size, (1, max(1, length)), generator=generator)
        input_ids = input_ids.to(self.device)
        lanes = rt.executor.lanes
        tracer = Tracer(lanes)
        lanes.tracer = tracer
        steps = {"n": 0}

        # one span per forward (the prefill, then each decode step) on the host row
        def step_start(module, args, kwargs):
            steps["n"] += 1
            steps["t"] = time.perf_counter()

        def step_end(module, args, kwargs, output):
            tracer.host_spans.append(("host", f"forward {steps['n']}", steps["t"], time.perf_counter()))

        handles = [
            self.register_forward_pre_hook(step_start, with_kwargs=True),
            self.register_forward_hook(step_end, with_kwargs=True),
        ]
        try:
            self.generate(
                input_ids,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                **generate_kwargs,
            )
        finally:
            lanes.tracer = None
            for handle in handles:
                handle.remove()
        return tracer.save(path)

    def save_pretrained(self, *args, **kwargs):
        """Not supported: the weights live in the executor's homes, not in the module tree."""
        raise NotImplementedError(
            "a hybrid model keeps expert/MLP weights outside the module tree; save the original checkpoint "
            f"directory instead ({self.hybrid.source})"
        )

    def to(self, *args, **kwargs):
        """Moving a hybrid model would break its placement; reload with another device/dtype instead."""
        raise RuntimeError(
            "a hybrid model is placed across GPU, CPU and staging buffers; call "
            "HybridModelForCausalLM.from_pretrained(..., device=..., dtype=...) again instead of .to()"
        )

    def cuda(self, *args, **kwargs):
        """See :meth:`to`."""
        return self.to()

    def cpu(self, *args, **kwargs):
        """See :meth:`to`."""
        return self.to()


_SUBCLASSES: dict[type, type] = {}


def hybrid_class(base: type) -> type:
    cls = _SUBCLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (HybridGenerationMixin, base), {"__module__": base.__module__})
        _SUBCLASSES[base] = cls
    return cls


# -------------------------------------------------------------------------------------- helpers
