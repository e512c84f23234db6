"""The one set of options every entry point shares: ``from_pretrained``, ``plan``, the planner entry
(:func:`hf_hybrid.modeling.plan_model`) and the command line.

Every option is checked here, before any work starts (no config read, no weights, no planning), so a bad
argument costs nothing and names the fix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any

#: Token-assignment policies (see :func:`hf_hybrid.assignment.assign_tokens`): "adaptive" (the cost model;
#: decode steps divide large host experts between the lanes), "whole" (the cost model, whole experts only),
#: "static" (by home), "cpu" and "stream" (every host expert one way).
TOKEN_ASSIGNMENTS = ("adaptive", "whole", "static", "cpu", "stream")
#: The policies that divide large host experts between the lanes in decode-sized steps.
DIVIDING_ASSIGNMENTS = ("adaptive",)
PROFILE_CHOICES = ("auto", "measure", "default")
CPU_KERNEL_CHOICES = ("auto", "linear", "matmul_t", "onednn_packed")
#: The CPU lane's expert code: the native kernel where it builds and applies, torch ops otherwise
CPU_BACKENDS = ("auto", "native", "torch")


@dataclass(frozen=True)
class HybridOptions:
    """How a model is placed and loaded.

    Placement: ``gpu_memory`` (bytes or ``"6GiB"``: KV cache, workspace and staging count inside it;
    default free device memory minus 1.5 GiB), ``device`` (``"cuda"``, ``"cuda:1"``, or ``"cpu"`` to let
    the CPU stand in), ``dtype`` (default: the checkpoint's), ``max_context`` / ``max_batch_size`` (the KV
    cache reserved inside the budget), ``prefill_chunk`` (tokens per prefill forward the device workspace
    is sized for; default the workload's prompt length; ``generate`` prefills longer prompts in chunks of
    this size), ``workload`` (what the plan optimises for), ``placement`` (forced
    homes, ``{"layers.*.experts.0": "gpu"}``), ``token_assignment`` (``"adaptive"``, ``"static"``,
    ``"cpu"``, ``"stream"``, ``"whole"``), ``profile`` (a ``HardwareProfile``, ``"auto"``, ``"measure"``,
    ``"default"``), ``routing_stats`` (per-expert routing frequencies), ``mlp_slices`` (row slices per
    dense MLP), ``cpu_threads`` (the CPU lane's threads, 1..cores), ``cpu_kernels`` (CPU expert kernel
    per token count, ``"auto"`` or a method or ``{tokens: method}``), ``cpu_backend`` (``"auto"``: the
    native CPU expert kernel for decode-sized steps where it builds, else torch ops; ``"native"``: require
    it; ``"torch"``: torch ops only), ``predict_next_layer`` (decode steps apply the next layer's router to
    their own input and start copying the predicted host experts early; exact, but 17% slower decode on
    S1 on the H200, hence off), ``decode_graphs`` (``"auto"``: on CUDA, ``generate`` runs on a static KV cache and replays
    each layer's attention half of a decode step as a CUDA graph; ``True`` also on the CPU standing in,
    without capture; ``False``: transformers' dynamic cache and eager attention), ``decode_lookahead``
    (with decode graphs: a greedy decode step starts the next step's first layer on the lanes before
    ``generate`` asks for it, see :mod:`hf_hybrid.decode_lookahead`; exact, but 3% slower decode on S1 on
    the H200 machine, where the feeding thread, not the lanes, bounds the token boundary; hence off),
    ``expert_graphs`` (``True``: a one-token decode step replays each whole expert the GPU computes as a
    CUDA graph over static buffers, see :mod:`hf_hybrid.expert_graphs`; uncaptured on the CPU standing in;
    ``False``: kernel by kernel), ``prefill_splits`` (``True``: token assignment "adaptive" divides each
    large host expert of a prefill-sized step between the CPU lane's GEMMs and the copy lane, so both
    finish together; exact within the ulps of an fp32 sum; off until measured on the device machine),
    ``attn_implementation``.

    Loading: ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``trust_remote_code`` mean
    what they mean in transformers; ``allow_pickle`` allows ``.bin``/``.pt`` shards;
    ``allow_cpu_fallback`` lets ``device="cuda"`` fall back to the CPU; ``progress`` shows progress bars.
    """

    gpu_memory: int | float | str | None = None
    device: Any = None
    dtype: Any = None
    max_context: int = 4096
    max_batch_size: int = 1
    prefill_chunk: int | None = None
    workload: Any = None
    placement: dict[str, str] | None = None
    token_assignment: str = "adaptive"
    profile: Any = "auto"
    routing_stats: dict[str, float] | None = None
    mlp_slices: int | None = None
    cpu_threads: int | None = None
    cpu_kernels: str | dict[int, str] = "auto"
    cpu_backend: str = "auto"
    predict_next_layer: bool = False
    decode_graphs: bool | str = "auto"
    decode_lookahead: bool = False
    expert_graphs: bool = True
    prefill_splits: bool = False
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    allow_cpu_fallback: bool = False
    allow_pickle: bool = False
    progress: bool = True
    revision: str | None = None
    token: str | bool | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every option's name."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> tuple[HybridOptions, dict[str, Any]]:
        """(the options named in ``kwargs``, validated; the other kwargs, e.g. config overrides).

        ``torch_dtype`` is accepted as an alias of ``dtype``, as in transformers.
        """
        rest = dict(kwargs)
        alias = rest.pop("torch_dtype", None)
        mine = {name: rest.pop(name) for name in cls.names() if name in rest}
        if alias is not None and mine.get("dtype") is None:
            mine["dtype"] = alias
        options = cls(**mine)
        options.validate()
        return options, rest

    def with_(self, **changes: Any) -> HybridOptions:
        """A copy with ``changes``, validated."""
        options = replace(self, **changes)
        options.validate()
        return options

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the option and the accepted values."""
        for name in ("max_context", "max_batch_size"):
            _positive_int(name, getattr(self, name))
        if self.mlp_slices is not None:
            _positive_int("mlp_slices", self.mlp_slices)
        if self.prefill_chunk is not None:
            _positive_int("prefill_chunk", self.prefill_chunk)
        if self.cpu_threads is not None:
            cores = os.cpu_count() or 1
            if not isinstance(self.cpu_threads, int) or isinstance(self.cpu_threads, bool):
                raise TypeError(f"cpu_threads must be an int in 1..{cores} (got {self.cpu_threads!r})")
            if not 1 <= self.cpu_threads <= cores:
                raise ValueError(
                    f"cpu_threads must be in 1..{cores}, the cores of this machine (got {self.cpu_threads})"
                )
        if isinstance(self.gpu_memory, float) and not math.isfinite(self.gpu_memory):
            raise ValueError(f"gpu_memory must be a finite size such as '6GiB' (got {self.gpu_memory!r})")
        if self.token_assignment not in TOKEN_ASSIGNMENTS:
            raise ValueError(
                f"token_assignment must be one of {', '.join(TOKEN_ASSIGNMENTS)} (got {self.token_assignment!r})"
            )
        if isinstance(self.profile, str) and self.profile not in PROFILE_CHOICES:
            raise ValueError("profile must be a HardwareProfile, 'auto', 'measure' or 'default'")
        if isinstance(self.cpu_kernels, str) and self.cpu_kernels not in CPU_KERNEL_CHOICES:
            raise ValueError(
                f"cpu_kernels must be one of {', '.join(CPU_KERNEL_CHOICES)} or {{tokens: method}} "
                f"(got {self.cpu_kernels!r})"
            )
        if self.cpu_backend not in CPU_BACKENDS:
            raise ValueError(
                f"cpu_backend must be one of {', '.join(CPU_BACKENDS)} (got {self.cpu_backend!r})"
            )
        if self.decode_graphs not in (True, False, "auto"):
            raise ValueError(f"decode_graphs must be 'auto', True or False (got {self.decode_graphs!r})")
        if not isinstance(self.decode_lookahead, bool):
            raise TypeError(f"decode_lookahead must be True or False (got {self.decode_lookahead!r})")
        if not isinstance(self.expert_graphs, bool):
            raise TypeError(f"expert_graphs must be True or False (got {self.expert_graphs!r})")
        if not isinstance(self.prefill_splits, bool):
            raise TypeError(f"prefill_splits must be True or False (got {self.prefill_splits!r})")
        if self.placement is not None and not isinstance(self.placement, dict):
            raise TypeError(
                f"placement must be a dict of unit pattern -> home (got {type(self.placement).__name__})"
            )


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int (got {value!r})")
