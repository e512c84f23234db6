"""What a loaded hybrid model carries: its runtime (plan, executor, hooks, lock) and the methods mixed into
its own class -- calls (``model(...)``, ``generate``, ``calibrate``, ``trace``) guarded against
``max_context`` and serialised per model, and refusals of what a placed model cannot do (``to``, ``half``
and the other casts, ``save_pretrained``).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NoReturn

import torch
from transformers.utils import logging

from .decode_graphs import DecodeGraphs, cache_argument
from .decode_lookahead import greedy_call
from .errors import ContextLengthError
from .executor import Executor
from .hooks import cudnn_attention_off, detach
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
    decode_graphs: DecodeGraphs | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    # calls of this model nested inside the one holding the lock (generate -> forward); changed only by the
    # thread that holds the lock
    _depth: int = field(default=0, init=False, repr=False)

    @contextmanager
    def serialised(self) -> Iterator[None]:
        """Hold the model's lock for one call; when the outermost call fails, reset the lanes.

        Every entry point that runs the model takes it: the staging rings' tag-to-slot maps, the pinned
        buffers and the streamed modules' swapped parameters belong to one step at a time, and two threads
        interleaving their steps would corrupt them for good. The lock is re-entrant, so ``generate`` (which
        holds it) can call the model's forward (which takes it again). Failures of any kind -- an exception
        in a lane, CUDA OOM, Ctrl-C -- release it, and the outermost call resets the executor's lanes before
        the error propagates, so the model stays usable.
        """
        with self.lock:
            outermost = self._depth == 0
            self._depth += 1
            try:
                yield
            except BaseException:
                if outermost:
                    self.executor.recover()
                raise
            finally:
                self._depth -= 1

    def check_length(self, positions: int, batch: int, needs: str, fix: str) -> None:
        """Raise :class:`ContextLengthError` when a call needs more than the KV cache was reserved for.

        ``needs`` says where ``positions`` come from and ``fix`` what the caller can change.
        """
        if positions > self.max_context:
            raise ContextLengthError(
                f"this call needs {positions} positions ({needs}) but the KV cache was reserved for "
                f"max_context={self.max_context}. {fix}, or reload with a larger max_context."
            )
        if batch > self.max_batch_size:
            raise ContextLengthError(
                f"batch of {batch} sequences exceeds max_batch_size={self.max_batch_size} the KV cache was "
                f"reserved for; reload with max_batch_size={batch}."
            )

    def close(self) -> None:
        """Stop the CPU worker, remove hooks and release staging and pinned buffers.

        Waits for a call running in another thread to finish: its buffers are not pulled from under it.
        """
        with self.lock:
            detach(self.handles)
            self.handles = []
            if self.decode_graphs is not None:
                self.decode_graphs.release()
            self.executor.close()


def _refuse_move(method: str) -> NoReturn:
    """Raise the error every move or cast of a placed model gets (``method``: the call, or what it does);
    nothing has changed when it is raised."""
    call = f".{method}()" if method.isidentifier() else method
    raise RuntimeError(
        f"a hybrid model is placed across GPU, CPU and staging buffers; {call} would move or cast its "
        "weights out of those homes. Call HybridModelForCausalLM.from_pretrained(..., device=..., dtype=...) "
        "again instead."
    )


def _refusal(method: str):
    """A model method ``method`` that refuses with :func:`_refuse_move`."""

    def refuse(self, *args, **kwargs) -> NoReturn:
        _refuse_move(method)

    refuse.__name__ = refuse.__qualname__ = method
    refuse.__doc__ = (
        f"Refused: ``.{method}()`` would move or cast the weights out of their homes; load the model again "
        "with ``from_pretrained(..., device=..., dtype=...)`` instead."
    )
    return refuse


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

    def __call__(self, *args, **kwargs):
        """The model's forward (with its hooks), checked against ``max_context`` and serialised per model.

        See :meth:`HybridRuntime.serialised`: concurrent callers wait for each other, and a failed call
        leaves the model usable.
        """
        self._check_forward(args, kwargs)
        with self.hybrid.serialised():
            return super().__call__(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """transformers ``generate``, checked against ``max_context`` and serialised per model.

        A failed or interrupted call (an exception in a lane, CUDA OOM, Ctrl-C) resets the executor's
        lanes before the error propagates, so the model stays usable. A prompt longer than the plan's
        ``prefill_chunk`` is prefilled in chunks of that size (transformers' ``prefill_chunk_size``), so
        its activations fit the workspace the plan reserved; a ``prefill_chunk_size`` of the caller's wins.
        """
        self._check_context(args, kwargs)
        with self.hybrid.serialised():
            starts: list[float] = []  # host time at the start of each forward: prefill, then decode steps
            kwargs = self._with_prefill_chunks(args, kwargs)
            kwargs = self._with_static_cache(args, kwargs)
            handle = self.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
            chunks = self._follow_prefill_chunks(args, kwargs)
            lookahead = self._begin_lookahead(args, kwargs)
            try:
                out = super().generate(*args, **kwargs)
            except BaseException:
                if lookahead is not None:
                    lookahead[0].end_call(failed=True)
                raise
            finally:
                handle.remove()
                if chunks is not None:
                    chunks.remove()
                    self.hybrid.executor.prefill_follows = False
                if lookahead is not None:
                    lookahead[1].remove()
            if lookahead is not None:
                lookahead[0].end_call()
            self._record_throughput(args, kwargs, starts, time.perf_counter())
            return out

    def _follow_prefill_chunks(self, args, kwargs):
        """When this call prefills its prompt in chunks, a forward pre-hook that tells the executor before
        each forward whether another prompt chunk follows it (so the copy lane starts the next chunk's first
        layer during this one's last: :meth:`~hf_hybrid.executor.Executor._prefetch_next`); None otherwise.
        Only what is staged depends on it, never a result."""
        chunks = self._prefill_forwards(args, kwargs)
        if chunks is None or chunks <= 1:
            return None
        executor, forwards = self.hybrid.executor, [0]

        def before_forward(*_) -> None:
            executor.prefill_follows = forwards[0] < chunks - 1
            forwards[0] += 1

        return self.register_forward_pre_hook(before_forward)

    def _begin_lookahead(self, args, kwargs):
        """Arm the decode lookahead (:mod:`hf_hybrid.decode_lookahead`) for a greedy call on the kept static
        cache; returns (lookahead, forward-hook handle) or None (it is switched off, or the call does not
        qualify: then no hook runs after each forward)."""
        graphs = self.hybrid.decode_graphs
        lookahead = None if graphs is None else graphs.lookahead
        cache = kwargs.get(cache_argument(type(self)))
        gen_config = kwargs.get("generation_config") or self.generation_config
        if (
            lookahead is None
            or not lookahead.enabled
            or cache is None
            or cache is not graphs.cache
            or not greedy_call(kwargs, gen_config)
        ):
            return None
        input_ids = self._input_ids(args, kwargs)
        new_tokens = kwargs.get("max_new_tokens", getattr(gen_config, "max_new_tokens", None))
        if new_tokens is None:
            max_length = kwargs.get("max_length", getattr(gen_config, "max_length", None))
            if max_length is not None and input_ids is not None:
                new_tokens = max_length - input_ids.shape[-1]
        prompt = input_ids.shape[-1] if input_ids is not None else 0
        lookahead.begin_call(new_tokens, prompt)
        on_cuda = self.hybrid.executor.lanes.is_cuda

        def after_forward(_module, _args, output) -> None:
            # layer 0 must run with the kernels the forward itself uses (cuDNN attention off, see hooks)
            with cudnn_attention_off() if on_cuda else contextlib.nullcontext():
                lookahead.after_forward(getattr(output, "logits", None))

        return lookahead, self.register_forward_hook(after_forward)

    def create_masks_for_generate(self, *args, **kwargs):
        """transformers' 4-D attention mask of a generate step on a static cache (``generate`` looks this
        method up on the model). Decode steps on the kept static cache get it by an update of the last
        step's mask (:mod:`hf_hybrid.decode_masks`); everything else is built by transformers."""
        build = getattr(super(), "create_masks_for_generate", None)
        if build is None:
            from transformers.masking_utils import create_masks_for_generate as build
        graphs = self.hybrid.decode_graphs
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if args or graphs is None or cache is None or cache is not graphs.cache:
            return build(*args, **kwargs)
        return graphs.masks.next(build, kwargs)

    def _with_prefill_chunks(self, args, kwargs) -> dict:
        """``kwargs`` with ``prefill_chunk_size`` set to the plan's ``prefill_chunk`` when the prompt is longer
        than that, the caller chose no chunk size of their own, and the call keeps a KV cache."""
        chunk = getattr(self.hybrid.plan, "prefill_chunk", 0)
        input_ids = self._input_ids(args, kwargs)
        if not chunk or input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] <= chunk:
            return kwargs
        gen_config = kwargs.get("generation_config") or self.generation_config
        if (
            kwargs.get("inputs_embeds") is not None
            or kwargs.get("prefill_chunk_size", getattr(gen_config, "prefill_chunk_size", None)) is not None
            or kwargs.get("use_cache", getattr(gen_config, "use_cache", True)) is False
        ):
            return kwargs
        return {**kwargs, "prefill_chunk_size": chunk}

    def _with_static_cache(self, args, kwargs) -> dict:
        """``kwargs`` with the decode graphs' static KV cache, where this call can use it: no cache or cache
        implementation of the caller's, one sequence per prompt row (no beams, no extra sequences, whose
        caches transformers reorders or copies), no assistant model, and token ids as the prompt."""
        graphs = self.hybrid.decode_graphs
        if graphs is None:
            return kwargs
        input_ids = self._input_ids(args, kwargs)
        gen_config = kwargs.get("generation_config") or self.generation_config

        def setting(name: str):
            return kwargs.get(name, getattr(gen_config, name, None))

        if (
            input_ids is None
            or input_ids.dim() != 2
            or any(kwargs.get(name) is not None for name in ("past_key_values", "cache", "assistant_model"))
            or setting("cache_implementation") is not None
            or setting("use_cache") is False
            or (setting("num_beams") or 1) > 1
            or (setting("num_return_sequences") or 1) > 1
            or (setting("prompt_lookup_num_tokens") or 0) > 0
        ):
            # this call keeps its KV cache elsewhere: free the kept static cache (and its graphs) first, so
            # the device never holds the KV-cache memory the plan reserved twice
            graphs.release()
            return kwargs
        graphs.follow_module_changes()
        return {**kwargs, cache_argument(type(self)): graphs.cache_for(input_ids.shape[0])}

    def _record_throughput(self, args, kwargs, starts: list[float], finished: float) -> None:
        """Put what this generate call measured beside the plan's predictions (``hybrid_plan.measured``).

        generate waits for each step's token on the host, so the start of forward k + 1 marks the end of
        forward k: prefill = second start - first start, decode = the rest, without extra device syncs.
        """
        prefills = self._prefill_forwards(args, kwargs)
        if prefills is None or not starts:
            return
        batch, prompt = self._input_ids(args, kwargs).shape
        prefill_s = (starts[prefills] if len(starts) > prefills else finished) - starts[0]
        measured = {
            "prompt_tokens": prompt,
            "batch": batch,
            "prefill_tok_s": batch * prompt / max(prefill_s, 1e-9),
        }
        steps = len(starts) - prefills
        if steps > 0:
            measured["decode_steps"] = steps
            measured["decode_tok_s"] = batch * steps / max(finished - starts[prefills], 1e-9)
        self.hybrid.plan.measured = measured

    def _prefill_forwards(self, args, kwargs) -> int | None:
        """How many forwards a ``generate(*args, **kwargs)`` call prefills its prompt in: one per
        ``prefill_chunk_size`` chunk, else one; None when the prompt is not a 2-D tensor of token ids."""
        input_ids = self._input_ids(args, kwargs)
        if input_ids is None or input_ids.dim() != 2:
            return None
        gen_config = kwargs.get("generation_config") or self.generation_config
        chunk = kwargs.get("prefill_chunk_size", getattr(gen_config, "prefill_chunk_size", None))
        return -(-input_ids.shape[1] // chunk) if chunk else 1

    @staticmethod
    def _input_ids(args, kwargs):
        """The prompt tensor of a ``generate(*args, **kwargs)`` call (``None`` when it is not a tensor)."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            input_ids = kwargs.get("inputs")
        return input_ids if isinstance(input_ids, torch.Tensor) else None

    def _check_context(self, args, kwargs) -> None:
        """Refuse a ``generate`` call whose prompt (token ids or embeddings) and new tokens exceed the KV
        cache's ``max_context``, or whose sequences exceed its ``max_batch_size``, before any work."""
        prompt, rows = _extent(self._input_ids(args, kwargs), kwargs.get("inputs_embeds"))
        if prompt is None:
            return
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
        self.hybrid.check_length(total, batch, f"prompt {prompt} + new tokens", "Lower max_new_tokens")

    def _check_forward(self, args, kwargs) -> None:
        """Refuse a forward whose cached plus new positions exceed ``max_context``, or whose rows exceed
        ``max_batch_size``, before any work (transformers would run it, past the memory reserved)."""
        arg = _forward_arguments(type(self), args, kwargs)
        new, rows = _extent(arg("input_ids"), arg("inputs_embeds"))
        if new is None:
            return
        # transformers 5 names the cache argument ``cache``, and still takes the older names
        caches = (arg(name) for name in ("cache", "past_key_values", "cache_params"))
        cached = _cached_positions(next((c for c in caches if c is not None), None))
        self.hybrid.check_length(cached + new, rows, f"{cached} cached + {new} new", "Shorten the input")

    def set_token_assignment(self, mode: str) -> None:
        """Change how each layer step's host experts are divided between the CPU lane and streaming
        (``"adaptive"``, ``"whole"``, ``"static"``, ``"cpu"``, ``"stream"``), keeping every home; the plan's
        ``token_assignment`` and predictions follow, so ``hybrid_plan`` still describes what runs."""
        from dataclasses import replace

        from .options import TOKEN_ASSIGNMENTS
        from .planner import experts_per_layer, predict

        if mode not in TOKEN_ASSIGNMENTS:
            raise ValueError(f"token_assignment must be one of {', '.join(TOKEN_ASSIGNMENTS)} (got {mode!r})")
        rt = self.hybrid
        with rt.serialised():
            new = replace(rt.plan, token_assignment=mode, predicted={}, unit_times={}, measured={})
            predict(new, experts_per_layer(new.units, experts_per_token(self.config)))
            rt.executor.token_assignment = mode
            rt.plan = new

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
        with rt.serialised():
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
                        # routing counts are per token: rows beyond max_batch_size run as later batches
                        for rows in ids.split(rt.max_batch_size):
                            self(rows.to(self.device), use_cache=False)
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
            prefill_chunk=old.prefill_chunk,
            prefill_splits=old.prefill_splits,
        )
        new.kv_cache_bytes_per_1k = old.kv_cache_bytes_per_1k  # the cache did not change
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
        rt = self.hybrid
        if input_ids is None:
            length = min(rt.plan.workload.prompt_tokens, rt.max_context - max_new_tokens)
            generator = torch.Generator().manual_seed(0)
            input_ids = torch.randint(0, self.config.vocab_size, (1, max(1, length)), generator=generator)
        input_ids = input_ids.to(self.device)
        # the tracer and the per-forward hooks are the model's, shared by every caller: hold the lock from
        # attaching them until they are gone, so no other thread's steps land in (or break) this timeline
        with rt.serialised():
            return self._trace(path, input_ids, max_new_tokens, generate_kwargs)

    def _trace(self, path, input_ids: torch.Tensor, max_new_tokens: int, generate_kwargs: dict):
        """:meth:`trace` with the model's lock held."""
        from .trace import Tracer

        lanes = self.hybrid.executor.lanes
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

    # moving or casting a placed model would break its placement: each is refused, naming the call
    to = _refusal("to")
    cuda = _refusal("cuda")
    cpu = _refusal("cpu")
    half = _refusal("half")
    float = _refusal("float")
    bfloat16 = _refusal("bfloat16")
    double = _refusal("double")
    type = _refusal("type")

    def _apply(self, fn, recurse=True):
        # every other nn.Module move or cast (xpu, to_empty, ...) goes through _apply: refused before it
        # rebinds a parameter, which would leave the executor's views into staging slots and host arenas stale
        _refuse_move("a move or cast")


_SUBCLASSES: dict[type, type] = {}


def hybrid_class(base: type) -> type:
    """``base`` (a transformers model class) with :class:`HybridGenerationMixin` mixed in; one per base."""
    cls = _SUBCLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (HybridGenerationMixin, base), {"__module__": base.__module__})
        _SUBCLASSES[base] = cls
    return cls


# ------------------------------------------------------------------------------- call arguments


def _extent(input_ids, inputs_embeds) -> tuple[int | None, int]:
    """(positions, rows) of a call's token ids and/or embeddings; positions is None when it has neither."""
    positions, rows = None, 1
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() > 0:
        positions = input_ids.shape[-1]
        rows = input_ids.shape[0] if input_ids.dim() > 1 else 1
    if isinstance(inputs_embeds, torch.Tensor) and inputs_embeds.dim() > 1:
        positions = max(positions or 0, inputs_embeds.shape[-2])
        rows = max(rows, inputs_embeds.shape[0] if inputs_embeds.dim() > 2 else 1)
    return positions, rows


_FORWARD_PARAMETERS: dict[type, list[str]] = {}


def _forward_arguments(cls: type, args: tuple, kwargs: dict):
    """A lookup ``name -> value`` of a forward call's arguments, given by keyword or by position."""
    names = _FORWARD_PARAMETERS.get(cls)
    if names is None:
        names = [
            p.name
            for p in inspect.signature(cls.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ][1:]  # without self
        _FORWARD_PARAMETERS[cls] = names

    def arg(name: str):
        if name in kwargs:
            return kwargs[name]
        index = names.index(name) if name in names else len(args)
        return args[index] if index < len(args) else None

    return arg


def _cached_positions(past_key_values) -> int:
    """Positions already in a forward's KV cache (a transformers ``Cache`` or the legacy tuple form)."""
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    try:
        return int(past_key_values[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0
