"""A timeline of the executor's lanes as a Chrome / Perfetto trace (open it in ui.perfetto.dev).

Host work (the CPU lane, the feeding thread) is timed with ``perf_counter``; device work (copies on the
copy stream, kernels on the compute stream) with timing events from :class:`hf_hybrid.lanes.DeviceLanes`,
converted to the same clock after the run so the lanes line up.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .profile import write_private_file

LANES = {"host": 1, "CPU lane": 2, "PCIe copy": 3, "GPU": 4}


class Tracer:
    """Collects spans per lane; ``save(path)`` writes Chrome trace JSON."""

    def __init__(self, lanes):
        self.lanes = lanes
        self.device = lanes.device
        self.is_cuda = lanes.is_cuda
        self.host_spans: list[tuple[str, str, float, float]] = []
        self.device_spans: list[tuple[str, str, object, object]] = []
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()
        self.base_event = None
        if self.is_cuda:
            lanes.synchronize()
            self.base_event = lanes.timing_event()
            self.base_event.record()
            lanes.synchronize()
            self.t0 = time.perf_counter()

    @contextmanager
    def host_span(self, lane: str, name: str):
        """Time a block of host work on ``lane``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            with self.lock:
                self.host_spans.append((lane, name, start, end))

    def add_host_span(self, lane: str, name: str, start: float, end: float) -> None:
        """Record host work timed elsewhere (``perf_counter`` seconds), e.g. by the native lane's leader."""
        with self.lock:
            self.host_spans.append((lane, name, start, end))

    @contextmanager
    def device_span(self, lane: str, name: str, stream=None):
        """Time device work issued inside the block on ``stream`` (host-timed on the CPU stand-in)."""
        if not self.is_cuda:
            with self.host_span(lane, name):
                yield
            return
        start, end = self.lanes.timing_event(), self.lanes.timing_event()
        start.record(stream)
        try:
            yield
        finally:
            end.record(stream)
            with self.lock:
                self.device_spans.append((lane, name, start, end))

    def events(self) -> list[dict]:
        """Chrome trace events (microseconds since the tracer started)."""
        out = [
            {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": f"hf_hybrid ({self.device})"}},
        ]
        for lane, tid in LANES.items():
            out.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": lane}})
        for lane, name, start, end in self.host_spans:
            out.append(_span(lane, name, (start - self.t0) * 1e6, (end - start) * 1e6))
        if self.device_spans:
            self.lanes.synchronize()
            for lane, name, start, end in self.device_spans:
                begin_ms = self.base_event.elapsed_time(start)
                out.append(_span(lane, name, begin_ms * 1e3, start.elapsed_time(end) * 1e3))
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace; open it in https://ui.perfetto.dev or chrome://tracing.

        The file is written atomically with mode 0o600 (a trace shows the prompt's length and the
        machine's timings); a symbolic link at ``path`` is refused with ``FileExistsError``.
        """
        return write_private_file(path, json.dumps({"traceEvents": self.events(), "displayTimeUnit": "ms"}))


def _span(lane: str, name: str, ts_us: float, dur_us: float) -> dict:
    return {
        "name": name,
        "ph": "X",
        "pid": 1,
        "tid": LANES[lane],
        "ts": round(ts_us, 3),
        "dur": round(dur_us, 3),
    }
