"""The only module that touches streams, events, threads and pinned buffers.

Three lanes run at once:

* the **copy lane**: a side CUDA stream that copies pinned host weights into device staging slots
  (:class:`DeviceLanes`; which slot is :mod:`hf_hybrid.staging`'s business);
* the **GPU lane**: the model's own (current) stream computing resident units and arrived streamed units;
* the **CPU lane**: one worker thread computing CPU units on the host weights in place (:class:`CpuLane`);
  a decode step's native job is instead started by the feeding thread itself on the native pool's own
  leader thread (:meth:`CpuLane.start_native`), so no Python thread wakes between the step's routing and
  the kernel, or between the kernel's end and the join.

Events order them: the GPU lane waits for a slot's copy event, the copy lane waits for a slot's "free"
event before overwriting it, and the CPU lane sleeps on a blocking event until the activations it needs
have arrived in pinned memory. Nothing spin-waits: a spinning waiter steals a core from the CPU lane
(measured 60 -> 15-33 GB/s on a 16-core Xeon). With ``device="cpu"`` (the CPU standing in for the
accelerator) the same code runs: copies become host memcpy, events are no-ops, and the CPU lane still
runs concurrently with the main thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import nullcontext
from typing import Any

import torch

from .errors import ExecutionError
from .weights import can_pin

_thread_state = threading.local()


# ----------------------------------------------------------------------------------- thread counts
def cpu_lane_threads(is_cuda: bool, requested: int | None = None) -> int:
    """The CPU lane's thread count: ``requested``, else torch's count minus one core left to the thread
    that feeds a GPU (its spinning OpenMP team would otherwise compete with the CPU lane's threads)."""
    if requested:
        return requested
    return max(1, torch.get_num_threads() - (1 if is_cuda else 0))


def sync_thread_count() -> None:
    """Make a (worker) thread honour ``torch.set_num_threads``.

    OpenMP/MKL thread counts are per-thread settings: a fresh worker thread that calls MKL or oneDNN
    directly uses the OpenMP default (all cores) even if the main thread set fewer, which oversubscribes
    cores when the main thread also computes. Re-applying torch's global count once per thread (and
    whenever it changed) fixes that at the cost of one cheap call.
    """
    if getattr(_thread_state, "fixed", False):
        return  # this thread's count was chosen explicitly (the CPU lane)
    wanted = torch.get_num_threads()
    if getattr(_thread_state, "threads", None) != wanted:
        torch.set_num_threads(wanted)
        _thread_state.threads = wanted


def fix_thread_count(threads: int) -> None:
    """Give the calling thread ``threads`` intra-op threads for good (not re-synced to the global count).

    The CPU lane calls this in its worker so that the thread feeding the GPU can run with one thread
    without shrinking the CPU lane (OpenMP thread counts are per calling thread).
    """
    torch.set_num_threads(threads)
    _thread_state.threads = threads
    _thread_state.fixed = True


# ---------------------------------------------------------------------------- copy and GPU lanes
class _NoEvent:
    """Stands in for a CUDA event when the CPU stands in for the accelerator: everything is already done."""

    def record(self, stream=None):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True


class DeviceLanes:
    """Streams and events of the accelerator, or synchronous stand-ins on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.is_cuda else None
        self._capture_stream = None  # made on first use by capture_in_step
        self.tracer = None  # a hf_hybrid.trace.Tracer while a trace is recorded

    def span(self, lane: str, name: str, stream=None):
        """A trace span of device work (a no-op unless a trace is being recorded)."""
        if self.tracer is None:
            return nullcontext()
        return self.tracer.device_span(lane, name, stream)

    def host_span(self, lane: str, name: str):
        """A trace span of host work (a no-op unless a trace is being recorded)."""
        if self.tracer is None:
            return nullcontext()
        return self.tracer.host_span(lane, name)

    def event(self):
        """A fresh event; blocking so a host wait sleeps instead of spinning."""
        return torch.cuda.Event(blocking=True) if self.is_cuda else _NoEvent()

    def compute_stream(self):
        """The stream the model computes on (the current one)."""
        return torch.cuda.current_stream(self.device) if self.is_cuda else None

    def copy_into(self, dst: torch.Tensor, src: torch.Tensor, wait_for=None, label: str = "copy"):
        """Copy ``src`` (pinned host) into ``dst`` (device, contiguous) on the copy lane; returns the arrival
        event. ``src`` may be a column block of a row-major matrix (rows contiguous, a row stride larger
        than the row): it crosses PCIe as one 2-D copy, see :meth:`can_copy_column_blocks`."""
        return self.copy_parts([dst], [src], wait_for=wait_for, label=label)

    def copy_parts(self, dsts, srcs, wait_for=None, event=None, label: str = "copy"):
        """Copy each of ``srcs`` (pinned host) into the matching ``dsts`` (device, contiguous) on the copy
        lane, in order, after ``wait_for``; returns the arrival event of them all: ``event`` recorded again
        (a staging slot keeps one per slot: a wait issued earlier keeps the record it saw) or a new one.

        Contiguous parts are issued as ``cudaMemcpyAsync`` calls on the copy stream directly: no stream
        switch or tensor dispatch on the feeding thread, which issues several such copies in every decode
        layer step (~10-30 us each through ``copy_`` under a stream context)."""
        if not self.is_cuda:
            with self.span("PCIe copy", label):
                for dst, src in zip(dsts, srcs):
                    dst.copy_(src)
            return event if event is not None else _NoEvent()
        stream = self.copy_stream
        if wait_for is not None:
            stream.wait_event(wait_for)
        lib = _cuda_runtime()
        with self.span("PCIe copy", label, stream):
            for dst, src in zip(dsts, srcs):
                if not src.is_contiguous():
                    _copy_column_block(dst, src, stream)
                elif lib is not None and dst.is_contiguous() and dst.dtype == src.dtype:
                    _copy_contiguous(lib, dst, src, stream)
                else:
                    with torch.cuda.stream(stream):
                        dst.copy_(src, non_blocking=True)
        if event is None:
            event = torch.cuda.Event(blocking=True)
        event.record(stream)
        return event

    def can_copy_column_blocks(self) -> bool:
        """Whether :meth:`copy_into` can copy a column block of a host matrix without a host-side gather
        (torch's ``copy_`` would first make a pageable contiguous copy on the CPU, at a few GB/s)."""
        return not self.is_cuda or _cuda_runtime() is not None

    def wait(self, event) -> None:
        """Make the GPU lane wait for ``event`` (no host blocking)."""
        if self.is_cuda and event is not None:
            self.compute_stream().wait_event(event)

    def record(self, event=None):
        """An event marking 'everything issued so far on the GPU lane': ``event`` recorded again, or a new
        one."""
        ev = self.event() if event is None else event
        if self.is_cuda:
            ev.record(self.compute_stream())
        return ev

    def is_done(self, event) -> bool:
        """Whether the device work ``event`` marks has finished (never blocks; always on the CPU stand-in)."""
        return event is None or bool(event.query())

    def timing_event(self):
        """An event that records a timestamp (for traces); None on the CPU stand-in."""
        return torch.cuda.Event(enable_timing=True) if self.is_cuda else None

    def capture_graph(self, fn: Callable[[], Any], pool, before_capture: Callable[[], None] | None = None):
        """Record ``fn`` as a CUDA graph on this device; returns ``(graph, fn's outputs)``.

        ``fn`` runs once on a side stream first (cuBLAS and the allocator set up their per-stream state there,
        which a capture may not do), then ``before_capture`` undoes what that run changed (a KV cache's
        position), then the capture records ``fn`` without running it. ``pool`` is a graph memory pool shared by
        graphs that never run at the same time. The caller replays the graph to run the step.
        """
        self._run_beside(torch.cuda.Stream(self.device), fn)
        if before_capture is not None:
            before_capture()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the CPU lane's worker may call into CUDA-free torch code meanwhile
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = fn()
        return graph, outputs

    def _run_beside(self, side, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the stream ``side``, after the compute stream's work so far and before its next."""
        current = torch.cuda.current_stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            fn()
        current.wait_stream(side)

    def capture_in_step(self, fn: Callable[[], None], pool):
        """Run ``fn`` once and record it as a CUDA graph, in the middle of a step; returns the graph.

        Unlike :meth:`capture_graph` (``torch.cuda.graph``) nothing waits for the device or empties the
        allocator's cache: both stall every lane and cost milliseconds, more than the graph saves when
        recorded during a decode step. ``fn`` runs on a side stream (ordered after the compute stream's work,
        and the compute stream after it) - that run is the real one - then the same stream records it into
        ``pool``, a graph memory pool shared by graphs that never run at the same time.
        """
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.device)
        side = self._capture_stream
        self._run_beside(side, fn)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            # thread_local: the CPU lane's worker may call into CUDA-free torch code meanwhile
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                fn()
            finally:
                graph.capture_end()
        return graph

    def synchronize(self) -> None:
        """Wait until every lane's device work is done (after a failed step, before a trace is read)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)


# ------------------------------------------------------------------------------------- CPU lane
class NativeLaneCall:
    """A layer step's job started on the native CPU lane by the feeding thread (:meth:`CpuLane.start_native`);
    :meth:`CpuLane.join` sleeps on it in the library. ``error``: what failed while starting it, raised at
    the join as a job's own failure would be."""

    def __init__(self, lane, label: str, tracer) -> None:
        self.lane = lane
        self.label = label
        self.tracer = tracer
        self.error: BaseException | None = None

    def wait(self) -> tuple[torch.Tensor, float]:
        """The job's fp32 output and its seconds computing (the leader's clock around the call)."""
        if self.error is not None:
            raise self.error
        out, started, ended = self.lane.wait()
        if self.tracer is not None:
            self.tracer.add_host_span("CPU lane", self.label, started, ended)
        return out, ended - started


class CpuLane:
    """One worker thread whose torch ops use ``threads`` intra-op threads; jobs run one at a time.

    Started on first use and stopped by :meth:`close`; after ``close`` a new job raises
    :class:`~hf_hybrid.errors.ExecutionError` instead of silently starting a new thread.
    """

    def __init__(self, threads: int):
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.closed = False

    def _worker(self) -> ThreadPoolExecutor:
        with self._lock:
            if self.closed:
                raise ExecutionError("this model was closed: load it again to run it")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_hybrid-cpu-lane")
                # torch's intra-op thread count is per calling thread under OpenMP: set it in the worker
                self._pool.submit(fix_thread_count, self.threads).result()
            return self._pool

    def submit(self, job: Callable[[], Any]) -> Future:
        """Run ``job`` on the CPU lane; returns its future."""
        return self._worker().submit(job)

    def start_native(
        self, native_lane, packed, arrived=None, on_start=None, label: str = "", tracer=None
    ) -> NativeLaneCall:
        """Start a native job (``native_lane.start``, output zeroed first) from the calling thread, once the
        activations it reads are here (``arrived``: a blocking event; the executor copies them before it
        reads the routing back, so by now they are); returns a call :meth:`join` takes like a future.
        ``on_start`` (the fault hook) runs first; what it or the start raise is kept for the join."""
        with self._lock:
            if self.closed:
                raise ExecutionError("this model was closed: load it again to run it")
        call = NativeLaneCall(native_lane, label, tracer)
        try:
            if on_start is not None:
                on_start()
            if arrived is not None:
                arrived.synchronize()
            native_lane.start(packed, zero_out=True)
        except BaseException as exc:  # noqa: BLE001 - raised at the join, where a job's failure is
            call.error = exc
        return call

    def run(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` on the CPU lane and return its result (the caller sleeps meanwhile)."""
        return self.submit(job).result()

    @staticmethod
    def settle(future: Future | None) -> None:
        """Wait for ``future`` without raising (an abandoned step lets its CPU job finish first)."""
        if isinstance(future, NativeLaneCall):
            if future.error is None:
                try:
                    future.wait()
                except Exception:  # noqa: BLE001 - the step is abandoned; its own error is not asked for
                    pass
        elif future is not None:
            wait_futures([future])

    @staticmethod
    def join(future: Future, layer: int) -> Any:
        """Sleep until ``future`` is done and return its result; a failure becomes an ``ExecutionError``.

        A Ctrl-C while the caller sleeps here propagates as is; one raised inside the job too.
        """
        if isinstance(future, NativeLaneCall):
            try:
                return future.wait()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                raise ExecutionError(f"the CPU lane failed in layer {layer}: {exc!r}") from exc
        wait_futures([future])
        exc = future.exception()
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise exc
        if exc is not None:
            raise ExecutionError(f"the CPU lane failed in layer {layer}: {exc!r}") from exc
        return future.result()

    def close(self) -> None:
        """Stop the worker (waits for a running job)."""
        with self._lock:
            self.closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


class PinnedPool:
    """Reusable pinned host buffers by name: per-step buffers are reused, not re-made."""

    def __init__(self, pin: bool):
        self.pin = pin and can_pin()
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A buffer of at least ``shape`` under ``key``, viewed as ``shape``."""
        numel = 1
        for s in shape:
            numel *= s
        buf = self._buffers.get((key, dtype))
        if buf is None or buf.numel() < numel:
            # a plain tensor even when the first call runs under inference_mode: an inference tensor could
            # not be written by a later call made under no_grad (calibrate, a user's loop)
            with torch.inference_mode(False):
                buf = torch.empty(max(numel, 1), dtype=dtype, pin_memory=self.pin)
            self._buffers[(key, dtype)] = buf
        return buf[:numel].view(shape)

    def __len__(self) -> int:
        return len(self._buffers)

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.nbytes for b in self._buffers.values())

    def clear(self) -> None:
        """Drop every buffer."""
        self._buffers.clear()


# ------------------------------------------------------------------------------------ measuring
def run_with_copies(
    lanes: DeviceLanes,
    cpu_lane: CpuLane,
    warm_up: Callable[[], None],
    cpu_work: Callable[[], None],
    passes: int,
    chunk_bytes: int,
    copies_per_wait: int,
    copies: bool = True,
) -> tuple[float, float]:
    """(seconds per pass of ``cpu_work`` on the CPU lane, copy rate in B/s while it ran).

    The CPU lane warms up, then both start at once: the lane runs ``cpu_work`` ``passes`` times while the
    calling thread keeps the copy lane busy with ``copies_per_wait`` copies of ``chunk_bytes`` per
    blocking wait (each wake-up costs: H100 host, CPU lane busy, 2 x 64 MiB per wait gave 33 GB/s of
    H2D, 8 x 64 MiB 44-47 GB/s). With ``copies=False`` the caller just waits: the lane alone.
    """
    if copies:
        src = torch.ones(chunk_bytes, dtype=torch.uint8)
        if lanes.is_cuda:
            src = src.pin_memory()
            dst = torch.empty(chunk_bytes, dtype=torch.uint8, device=lanes.device)
        else:
            dst = torch.empty_like(src)
        dst.copy_(src)  # warm-up (first touch / DMA mapping)
    barrier = threading.Barrier(2)
    done = threading.Event()

    def job() -> float:
        with torch.inference_mode():
            try:
                warm_up()  # per-thread OpenMP state and primitive caches of this thread
            except BaseException:
                barrier.abort()  # release the calling thread instead of leaving it waiting forever
                raise
            barrier.wait()
            try:
                t0 = time.perf_counter()
                for _ in range(passes):
                    cpu_work()
                return (time.perf_counter() - t0) / passes
            finally:
                done.set()

    future = cpu_lane.submit(job)
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        future.result()  # raises the worker's error
        raise
    copied = 0
    t0 = time.perf_counter()
    while copies and not done.is_set():
        if lanes.is_cuda:
            with torch.cuda.stream(lanes.copy_stream):
                for _ in range(copies_per_wait):
                    dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event(blocking=True)
                event.record(lanes.copy_stream)
            event.synchronize()  # sleeps in the driver until the copies finished
        else:
            for _ in range(copies_per_wait):
                dst.copy_(src)  # the CPU stands in for the device: a copy is a host memcpy
        copied += copies_per_wait * chunk_bytes
    copy_seconds = time.perf_counter() - t0
    seconds_per_pass = future.result()
    return seconds_per_pass, copied / copy_seconds if copied else 0.0


def time_h2d(lanes: DeviceLanes, nbytes: int, reps: int) -> float:
    """Pinned host -> device copy rate (B/s) on the copy lane, timed with CUDA events."""
    src = torch.ones(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=lanes.device)
    stream = lanes.copy_stream
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)  # warm-up: maps the pinned pages for DMA
        start = torch.cuda.Event(enable_timing=True, blocking=True)
        end = torch.cuda.Event(enable_timing=True, blocking=True)
        start.record(stream)
        for _ in range(reps):
            dst.copy_(src, non_blocking=True)
        end.record(stream)
    end.synchronize()  # blocking event: the thread sleeps instead of spinning
    return reps * src.nbytes / (start.elapsed_time(end) / 1e3)


def time_device(fn: Callable[[], object], reps: int) -> float:
    """Seconds per call of ``fn`` on the current CUDA stream (after one warm-up call)."""
    fn()  # warm-up: cuBLAS handle and kernel selection
    start = torch.cuda.Event(enable_timing=True, blocking=True)
    end = torch.cuda.Event(enable_timing=True, blocking=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


# ----------------------------------------------------------------------------------- 2-D copies
_CUDART: list = []  # [the CUDA runtime library torch loaded, or None], found once


def _cuda_runtime():
    """The CUDA runtime library this process already loaded with torch (ctypes), or None.

    torch has no 2-D host-to-device copy; ``cudaMemcpy2DAsync`` copies a column block of a pinned
    row-major matrix at PCIe rate in one call. The library is found among the loaded ones (its path differs
    between wheels and system installs), so the same runtime and context torch uses are used.
    """
    if _CUDART:
        return _CUDART[0]
    import ctypes

    lib = None
    candidates = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if line.strip() else ""
                if "libcudart" in path and path not in candidates:
                    candidates.append(path)
    except OSError:
        pass
    candidates += ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    for name in candidates:
        try:
            lib = ctypes.CDLL(name)
            fn = lib.cudaMemcpy2DAsync
        except (OSError, AttributeError):
            lib = None
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
        fn.argtypes += [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        lib.cudaMemcpyAsync.restype = ctypes.c_int
        lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.cudaMemcpyAsync.argtypes += [ctypes.c_void_p]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        break
    _CUDART.append(lib)
    return lib


_HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice


def _copy_contiguous(lib, dst: torch.Tensor, src: torch.Tensor, stream) -> None:
    """``dst.copy_(src, non_blocking=True)`` on ``stream`` for contiguous tensors of one dtype, as one
    ``cudaMemcpyAsync`` (``src`` pinned host memory that outlives the copy: a weight arena's)."""
    if dst.shape != src.shape:
        raise ExecutionError(f"copy between shapes {tuple(src.shape)} and {tuple(dst.shape)}")
    code = lib.cudaMemcpyAsync(
        dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size(), _HOST_TO_DEVICE, stream.cuda_stream
    )
    if code != 0:
        raise ExecutionError(f"cudaMemcpyAsync failed: {lib.cudaGetErrorString(code).decode()}")


def _copy_column_block(dst: torch.Tensor, src: torch.Tensor, stream) -> None:
    """``dst.copy_(src)`` for a 2-D ``src`` whose rows are contiguous but not adjacent, as ONE
    ``cudaMemcpy2DAsync`` on ``stream``."""
    if src.dim() != 2 or src.stride(1) != 1 or not dst.is_contiguous() or dst.shape != src.shape:
        raise ExecutionError(
            f"cannot copy a {tuple(src.shape)} block with strides {src.stride()} in one copy"
        )
    if src.dtype != dst.dtype:
        raise ExecutionError(f"2-D copy between dtypes {src.dtype} and {dst.dtype}")
    lib = _cuda_runtime()
    if lib is None:
        raise ExecutionError("the CUDA runtime library was not found: column blocks cannot be copied")
    elt = src.element_size()
    width = src.shape[1] * elt
    code = lib.cudaMemcpy2DAsync(
        dst.data_ptr(),
        width,
        src.data_ptr(),
        src.stride(0) * elt,
        width,
        src.shape[0],
        _HOST_TO_DEVICE,
        stream.cuda_stream,
    )
    if code != 0:
        raise ExecutionError(f"cudaMemcpy2DAsync failed: {lib.cudaGetErrorString(code).decode()}")
