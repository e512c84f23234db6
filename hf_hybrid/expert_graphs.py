"""One-token decode steps' GPU-lane experts, each replayed as a CUDA graph.

In a one-token decode step the feeding thread issues every whole GPU-lane expert (a resident one, a
streamed one in its staging slot) as 6-7 small kernels: gate/up, activation, product, down, the routing
weight, the fp32 add. Inside a step it shares the machine with the CPU lane, which keeps DRAM busy, and on
the H200 machine issuing one such expert took the feeding thread 120-260 us (resident) and 330-570 us
(streamed, with its copy): on S3 (top-8 of 128 small experts) most of a layer step. Here each expert's
kernels are captured as a CUDA graph that reads its inputs from static buffers, and a step replays it: per
expert one copy of its routing weight into the static buffer and one replay (31-95 us resident, 180-280
us streamed, measured the same way: S3 decode 1.02-1.14x on the H200 machine).

The GPU's rows of a divided expert stay kernel by kernel: their shapes follow the split, which moves with
the learned rates, and recording a graph per split cost S1 and S4 more than it saved. A graph is keyed by
the addresses, shapes and strides of the weights it reads (a resident unit's own tensors, or a staging
slot's carved views), so it follows the memory, not a unit: whatever weights lie at those addresses when
it replays are the ones it reads, which is what the step asks for when the key matches. The step's row, its
routing weight and the fp32 accumulator are static buffers of this object (one set per shape and dtype; a
model's steps run one at a time under its lock, and on one stream).

The kernels are the eager path's, on the same values in the same order, so the results are the same bits
(the CUDA tests check it). A key's first use runs the kernels eagerly; its second runs them and records
them (that run is the step's result), without the device-wide wait of ``torch.cuda.graph``; later uses
replay. On the CPU standing in for the accelerator nothing is captured: the same static-buffer path runs
eagerly, so it is tested everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kernels.cpu import gated_mlp

logger = logging.getLogger("hf_hybrid")


@dataclass
class _Statics:
    """The buffers every expert graph of one shape reads and writes."""

    x: torch.Tensor  # the step's row [1, hidden], model dtype
    weight: torch.Tensor  # one expert's routing weight [1, 1]
    acc: torch.Tensor  # the step's fp32 accumulator [1, hidden]


class ExpertGraphs:
    """The expert graphs of one executor (see the module docstring).

    ``lanes``: the executor's :class:`~hf_hybrid.lanes.DeviceLanes`; ``capture``: record CUDA graphs (else
    run the same static-buffer path eagerly, for the CPU standing in).
    """

    #: graphs kept at most (each holds a few kernel nodes; more keys than this run eagerly)
    MAX_GRAPHS = 8192

    def __init__(self, lanes, capture: bool):
        self.lanes = lanes
        self.capture = capture
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.failed: set[tuple] = set()
        self._seen: set[tuple] = set()  # keys used once, not recorded yet
        self.pool = None
        self._statics: dict[tuple, _Statics] = {}
        self._current: _Statics | None = None
        self.replays = 0
        self.captures = 0

    def begin(self, hidden: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
        """Start a one-token step on ``hidden`` [1, hidden]: its row goes into the static input and the static
        fp32 accumulator is zeroed. Returns that accumulator (the step adds its lanes' parts into it)."""
        key = (tuple(hidden.shape), hidden.dtype, weight_dtype, hidden.device)
        statics = self._statics.get(key)
        if statics is None:
            # plain tensors even when the first step runs under inference_mode: an inference tensor could
            # not be written by a later call made under no_grad (calibrate, a trace, a user's loop)
            with torch.inference_mode(False):
                statics = _Statics(
                    x=torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device),
                    weight=torch.empty((1, 1), dtype=weight_dtype, device=hidden.device),
                    acc=torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device),
                )
            self._statics[key] = statics
        statics.x.copy_(hidden)
        statics.acc.zero_()
        self._current = statics
        return statics.acc

    def whole(self, gate_up, down, act_fn: Callable, weight: torch.Tensor) -> None:
        """``acc += gated_mlp(x) * weight``: a whole expert, its output rounded to the model dtype and
        weighted there, as transformers does, then added in fp32."""
        s = self._current

        def compute() -> None:
            s.acc.add_(gated_mlp(s.x, gate_up, down, act_fn) * s.weight)

        self._run(("whole", act_fn, _layout(gate_up), _layout(down)), compute, weight)

    def clear(self) -> None:
        """Drop every graph and buffer (the model is closed, or its weights moved for good)."""
        self.graphs.clear()
        self.failed.clear()
        self._seen.clear()
        self._statics.clear()
        self._current = None
        self.pool = None

    def _run(self, key: tuple, compute: Callable[[], None], weight: torch.Tensor) -> None:
        s = self._current
        s.weight.copy_(weight)
        key = (id(s), *key)
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            self.replays += 1
            return
        if not self.capture or key in self.failed or len(self.graphs) >= self.MAX_GRAPHS:
            compute()
            return
        if key not in self._seen:
            # recorded on its second use: a key used once (an expert streamed into a slot once, a resident
            # expert routed to once) would cost a recording for nothing
            if len(self._seen) >= self.MAX_GRAPHS:
                self._seen.clear()
            self._seen.add(key)
            compute()
            return
        ran = []

        def recorded() -> None:
            compute()
            ran.append(True)

        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            # ``recorded`` runs once eagerly first: that run is this step's result, the capture only
            # records it for the next steps
            graph = self.lanes.capture_in_step(recorded, self.pool)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to the eager path
            self.failed.add(key)
            logger.warning(
                "hf_hybrid: an expert's kernels could not be captured as a CUDA graph (%s: %s); "
                "they run eagerly",
                type(exc).__name__,
                exc,
            )
            if not ran:
                compute()
            return
        self.graphs[key] = graph
        self.captures += 1


def _layout(t: torch.Tensor) -> tuple:
    """What a graph reading ``t`` depends on: its address, shape, strides and dtype."""
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
