"""What the CPU lane computes in a layer step: its units' gated MLPs on host weights, summed in fp32.

Each function returns a job (a plain callable) that the executor submits to the CPU lane; the job
sleeps until the activations it needs have arrived in pinned memory, computes, and returns
``(fp32 partial output, seconds computing)``. Nothing here chooses which units run on the CPU (that is
:func:`hf_hybrid.planner.assign_tokens`) or touches threads (that is :mod:`hf_hybrid.lanes`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from .kernels.cpu import CpuExpertKernel, partial_gated_mlp

#: (token ids, flat positions into the routing weights) of one unit's tokens; None = every token, weight 1;
#: positions None = weight 1 (a divided unit's part the executor weights after the join)
Rows = tuple[torch.Tensor, torch.Tensor | None] | None


@dataclass
class HostInputs:
    """Activations and routing weights as the CPU lane reads them, and the event of their arrival."""

    x: torch.Tensor
    weights: torch.Tensor | None
    arrived: object | None  # a blocking event (None: already on the host)


@dataclass
class RowPart:
    """The CPU lane's part of a unit divided between lanes: gate/up rows and down columns [0, r) (views of
    the host weights), for the unit's tokens."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    rows: Rows


def whole_units_job(
    kernels: list[CpuExpertKernel],
    row_lists: list[Rows],
    inputs: HostInputs,
    out: torch.Tensor,
    parts: list[RowPart] = (),
    act_fn: Callable | None = None,
    on_start: Callable[[], None] | None = None,
    span: Callable[[], AbstractContextManager] = nullcontext,
) -> Callable[[], tuple[torch.Tensor, float]]:
    """A job computing whole units with torch ops, ``out = sum_i weight_i * kernel_i(x[tokens_i])`` in
    fp32, plus the CPU lane's ``parts`` of divided units (fp32 down outputs, weighted in fp32)."""

    def compute() -> None:
        for kernel, rows in zip(kernels, row_lists):
            if rows is None:
                out.add_(kernel(inputs.x).float())
            else:
                tok, sel = rows
                y = kernel(inputs.x[tok]) * inputs.weights[sel, None]
                out.index_add_(0, tok, y.float())
        for part in parts:
            xs = inputs.x if part.rows is None else inputs.x[part.rows[0]]
            y = partial_gated_mlp(xs, part.gate, part.up, part.down, act_fn)
            if part.rows is None:
                out.add_(y)
            elif part.rows[1] is None:  # a part kept apart from the step's rows, unweighted
                out.index_add_(0, part.rows[0], y)
            else:
                tok, sel = part.rows
                out.index_add_(0, tok, y * inputs.weights[sel, None].float())

    return _lane_job(compute, inputs, out, on_start, span)


def _lane_job(
    compute: Callable[[], None],
    inputs: HostInputs,
    out: torch.Tensor,
    on_start: Callable[[], None] | None,
    span: Callable[[], AbstractContextManager],
) -> Callable[[], tuple[torch.Tensor, float]]:
    """What every CPU-lane job does around its computation: the fault hook, sleeping until the activations
    have arrived, zeroing ``out`` and timing; ``compute`` adds the units into ``out``."""

    def job() -> tuple[torch.Tensor, float]:
        if on_start is not None:
            on_start()
        if inputs.arrived is not None:
            inputs.arrived.synchronize()  # blocking event: this thread sleeps until the activations are here
        started = time.perf_counter()
        with span(), torch.inference_mode():
            out.zero_()
            compute()
        return out, time.perf_counter() - started

    return job


def native_units_job(
    lane,
    packed,
    inputs: HostInputs,
    out: torch.Tensor,
    on_start: Callable[[], None] | None = None,
    span: Callable[[], AbstractContextManager] = nullcontext,
) -> Callable[[], tuple[torch.Tensor, float]]:
    """A job computing a layer step's CPU work (whole units and parts of divided ones) in ONE call of the
    native kernel (:mod:`hf_hybrid.kernels.native`): it reads every weight row once for all of a unit's
    tokens, on its own sleeping thread pool, GIL released. Same result as :func:`whole_units_job` (torch's
    bf16 roundings mimicked, fp32 accumulation).

    ``packed`` is the step's job list already laid out by ``lane.pack`` (on the feeding thread, while the
    inputs were still arriving: the jobs pick their routing weights by position): once the activations
    are here, this thread only makes the call, and never waits for the interpreter lock in between while
    the feeding thread issues the device lanes."""
    return _lane_job(lambda: lane.run_packed(packed), inputs, out, on_start, span)
