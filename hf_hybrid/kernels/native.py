"""The native CPU expert lane: all of a layer step's CPU expert work in one call of a C kernel.

The torch path computes each expert with several ops (linear, chunk, act, mul, linear, mul, index_add),
one expert at a time, each op waking torch's OpenMP team; with 1-8 tokens per expert that reached about
52 GB/s of weight reads against about 126 GB/s of DRAM bandwidth. ``native/expert_lane.c`` reads each
weight row once, dots it with every token of its job, runs all jobs of the step in one parallel region on
its own sleeping thread pool (no OpenMP, so it never shares a team with torch) and adds the weighted results
into one fp32 output.

Where the CPU has AMX-BF16 (and Linux grants the process the tile state), bf16 jobs with many tokens
(prefill: at least ``amx_min_tokens``, default 16) run on AMX tiles instead: each weight block is packed
once and multiplied with every 16-token tile of the job, so a weight is read once for all of a job's tokens
at matrix-unit rates, where torch's per-expert ops reached only about 0.8 TFLOP/s in-process.

The C source is compiled on first use with the machine's own instruction set (``-march=native``: AVX-512
with BF16 dot products, AVX-512F, AVX2 or plain C) and cached under ``cache_root()/native``, keyed by the
source, the compiler's version and the CPU's flags. The library is loaded with :mod:`ctypes`, which releases
the GIL for the duration of a call.

Environment: ``HF_HYBRID_NATIVE=0`` disables the native path; ``HF_HYBRID_AMX=0`` keeps it off AMX tiles; ``HF_HYBRID_CC`` names the C compiler
(default ``gcc``).

Usage::

    from hf_hybrid.kernels import native

    if native.supports(torch.bfloat16, act_fn):
        lane = native.NativeExpertLane(threads=12)
        out = torch.zeros(T, H)
        lane.run(x, [native.ExpertJob(gate_up, down, tokens=tok, weights=w), ...], out)
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import struct
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.utils import logging

from ..system import cache_root

logger = logging.get_logger(__name__)

SOURCE = Path(__file__).with_name("native") / "expert_lane.c"
ABI_VERSION = 5

_X86 = platform.machine().lower() in ("x86_64", "amd64")

#: flags that make the compiler emit the AVX-512 code paths whatever the build machine has (compile-only
#: checks on machines without AVX-512; never load such a build where /proc/cpuinfo lacks the flags)
AVX512_FLAGS = ("-mavx512f", "-mavx512bf16", "-mavx512bw", "-mavx512vl")
#: the AVX2 variant on an AVX-512 machine (and the native one on an AVX2 machine)
AVX2_FLAGS = ("-mno-avx512f",)
#: plain C: on x86 no AVX at all (disabling AVX disables AVX2, FMA and AVX-512 with it); elsewhere no
#: auto-vectorisation
SCALAR_FLAGS = ("-mno-avx",) if _X86 else ("-fno-tree-vectorize",)
#: the AMX path with tiles emulated in C (plain arrays, the tile product computed in fp32): its packing and
#: edge handling run and are tested on any machine
AMX_EMULATE_FLAGS = ("-DHF_AMX_EMULATE",)
#: flags that make the compiler emit the AMX code path whatever the build machine has (compile-only checks)
AMX_FLAGS = (*AVX512_FLAGS, "-mamx-tile", "-mamx-bf16") if _X86 else ()

_ISA_NAMES = {2: "avx512_bf16", 1: "avx512f", 3: "avx2", 0: "scalar"}
_SUPPORTED_MACHINES = ("x86_64", "amd64", "aarch64", "arm64")

# tunables of the C pool (hf_lane_configure)
_OPT_BARRIER_SPIN_US = 1
_OPT_PREFETCH = 2
_OPT_DPBF16 = 3
_OPT_MIN_BYTES = 4
_OPT_IDLE_SPIN_US = 5
_OPT_K_BLOCK = 6
_OPT_AMX_MIN_TOKENS = 7
_OPT_WAIT_SPIN_US = 8
_OPT_SHORT_ROW = 9
#: bf16 jobs with at least this many tokens run on AMX tiles, where usable (the C pool's default)
DEFAULT_AMX_MIN_TOKENS = 16

_ERR_TOKEN = 5
_ERR_IDLE = 10
_PENDING = -1
#: how long one wait in the library lasts before Python gets control back (to deliver a Ctrl-C)
_WAIT_SLICE_US = 20_000


class NativeBuildError(RuntimeError):
    """The native library could not be compiled or loaded (the message says why)."""


class _HfJob(ctypes.Structure):
    """Mirror of ``hf_job`` in expert_lane.c (same field order and types)."""

    _fields_ = [
        ("gate", ctypes.c_void_p),
        ("up", ctypes.c_void_p),
        ("down", ctypes.c_void_p),
        ("tokens", ctypes.c_void_p),
        ("weights", ctypes.c_void_p),
        ("weight_index", ctypes.c_void_p),
        ("ld_gate_up", ctypes.c_int64),
        ("ld_down", ctypes.c_int64),
        ("r", ctypes.c_int64),
        ("ntok", ctypes.c_int64),
        ("nweights", ctypes.c_int64),
        ("round_bf16", ctypes.c_int32),
        ("weight_bf16", ctypes.c_int32),
        ("partial", ctypes.c_int32),
        ("act", ctypes.c_int32),
        ("weight_dtype", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


# The jobs are packed with one struct.pack_into per job: setting 15 ctypes fields one by one cost several
# times more Python time per job, and a layer step has up to a few dozen jobs.
_JOB_PACK = struct.Struct("=6Q5q6i")
assert _JOB_PACK.size == ctypes.sizeof(_HfJob)


# ------------------------------------------------------------------------------------------------------
# build and load


def _compiler() -> str:
    return os.environ.get("HF_HYBRID_CC") or "gcc"


def _compiler_version(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        raise NativeBuildError(f"C compiler {cc!r} cannot be run: {err}") from err
    if done.returncode != 0:
        raise NativeBuildError(f"C compiler {cc!r} --version failed with exit status {done.returncode}")
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else cc


def _cpu_flags() -> str:
    """The CPU feature line of /proc/cpuinfo (x86 ``flags``, Arm ``Features``), else the machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("flags", "features")):
                return line.split(":", 1)[1].strip()
    except (OSError, IndexError):
        pass
    return platform.machine()


def cpu_has(*flags: str) -> bool:
    """Whether /proc/cpuinfo lists every one of ``flags`` (e.g. ``"avx512f"``, ``"avx512_bf16"``)."""
    have = set(_cpu_flags().split())
    return all(f in have for f in flags)


def _native_dir() -> Path:
    return cache_root() / "native"


def compile_library(extra_flags: Sequence[str] | None = None, force_rebuild: bool = False) -> Path:
    """Compile ``expert_lane.c`` (unless cached) and return the shared library's path; does not load it.

    ``extra_flags`` go after ``-march=native`` (e.g. :data:`AVX2_FLAGS` for the AVX2 variant, or
    :data:`AVX512_FLAGS` to check that the AVX-512 code compiles on a machine without it). Concurrent
    processes are serialised by a file lock; the library appears atomically. Raises
    :class:`NativeBuildError`.
    """
    machine = platform.machine().lower()
    if machine not in _SUPPORTED_MACHINES:
        raise NativeBuildError(f"unsupported machine {platform.machine()!r} (x86_64 and aarch64 only)")
    flags = [str(f) for f in (extra_flags or ())]
    cc = _compiler()
    try:
        source = SOURCE.read_bytes()
    except OSError as err:
        raise NativeBuildError(f"C source missing: {err}") from err
    version = _compiler_version(cc)
    key = hashlib.sha256(
        b"\0".join([source, cc.encode(), version.encode(), _cpu_flags().encode(), " ".join(flags).encode()])
    ).hexdigest()[:16]
    folder = _native_dir()
    target = folder / f"libhf_hybrid_expert_lane-{key}.so"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f".lock-{key}", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same library
            if target.exists() and not force_rebuild:
                return target
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
            os.close(fd)
            try:
                cmd = [
                    cc,
                    "-O3",
                    "-march=native",
                    "-fPIC",
                    "-shared",
                    "-pthread",
                    "-std=c11",
                    *flags,
                    str(SOURCE),
                    "-o",
                    tmp,
                    "-lm",
                ]
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                except (OSError, subprocess.SubprocessError) as err:
                    raise NativeBuildError(f"C compiler {cc!r} cannot be run: {err}") from err
                if done.returncode != 0:
                    tail = "\n".join((done.stderr or done.stdout or "").strip().splitlines()[-8:])
                    raise NativeBuildError(
                        f"compiling {SOURCE.name} failed ({' '.join(cmd)}), exit status {done.returncode}:\n{tail}"
                    )
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except OSError as err:
        raise NativeBuildError(f"cannot write the native build cache {folder}: {err}") from err
    return target


class Library:
    """A loaded build of the kernel (one instruction-set variant), with its C signatures declared."""

    def __init__(self, path: Path) -> None:
        try:
            dll = ctypes.CDLL(str(path))  # CDLL (not PyDLL): calls release the GIL
        except OSError as err:
            raise NativeBuildError(f"cannot load {path}: {err}") from err
        self.path = path
        self.dll = dll
        dll.hf_lane_abi_version.restype = ctypes.c_int
        dll.hf_lane_abi_version.argtypes = []
        if dll.hf_lane_abi_version() != ABI_VERSION:
            raise NativeBuildError(f"{path} has ABI {dll.hf_lane_abi_version()}, expected {ABI_VERSION}")
        dll.hf_lane_job_size.restype = ctypes.c_int
        dll.hf_lane_job_size.argtypes = []
        if dll.hf_lane_job_size() != _JOB_PACK.size:
            raise NativeBuildError(
                f"{path}: hf_job is {dll.hf_lane_job_size()} bytes, expected {_JOB_PACK.size}"
            )
        dll.hf_lane_isa.restype = ctypes.c_int
        dll.hf_lane_isa.argtypes = []
        dll.hf_lane_amx.restype = ctypes.c_int
        dll.hf_lane_amx.argtypes = []
        dll.hf_lane_create.restype = ctypes.c_void_p
        dll.hf_lane_create.argtypes = [ctypes.c_int]
        dll.hf_lane_destroy.restype = None
        dll.hf_lane_destroy.argtypes = [ctypes.c_void_p]
        dll.hf_lane_threads.restype = ctypes.c_int
        dll.hf_lane_threads.argtypes = [ctypes.c_void_p]
        dll.hf_lane_last_stats.restype = ctypes.c_int
        dll.hf_lane_last_stats.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_double)]
        dll.hf_lane_configure.restype = ctypes.c_int
        dll.hf_lane_configure.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
        dll.hf_lane_strerror.restype = ctypes.c_char_p
        dll.hf_lane_strerror.argtypes = [ctypes.c_int]
        call_args = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        dll.hf_lane_run.restype = ctypes.c_int
        dll.hf_lane_run.argtypes = call_args
        dll.hf_lane_start.restype = ctypes.c_int
        dll.hf_lane_start.argtypes = [*call_args, ctypes.c_int]
        dll.hf_lane_wait.restype = ctypes.c_int
        dll.hf_lane_wait.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_double)]

    @property
    def isa(self) -> str:
        """The code path compiled in: ``"avx512_bf16"``, ``"avx512f"``, ``"avx2"`` or ``"scalar"``."""
        return _ISA_NAMES.get(self.dll.hf_lane_isa(), "unknown")

    @property
    def amx(self) -> bool:
        """Whether this build computes prefill-sized bf16 jobs on AMX tiles here: compiled in (an AMX CPU
        with ``-march=native``, or the emulated build) and, on the hardware, permitted by Linux."""
        return bool(self.dll.hf_lane_amx())

    def strerror(self, code: int) -> str:
        return (self.dll.hf_lane_strerror(code) or b"unknown error").decode()


_lock = threading.Lock()
_libraries: dict[tuple[str, ...], Library] = {}
_default: Library | None = None
_default_error: str | None = None
_warned = False


def load(extra_flags: Sequence[str] | None = None, force_rebuild: bool = False) -> Library:
    """Compile (if needed) and load a variant of the kernel; cached per process and flags.

    Raises :class:`NativeBuildError` when it cannot be built or loaded. Never load a build with
    :data:`AVX512_FLAGS` on a CPU without those features (it would die of an illegal instruction).
    """
    flags = tuple(str(f) for f in (extra_flags or ()))
    with _lock:
        lib = _libraries.get(flags)
        if lib is not None and not force_rebuild:
            return lib
        lib = Library(compile_library(flags, force_rebuild=force_rebuild))
        _libraries[flags] = lib
        return lib


def _default_library() -> Library | None:
    """The ``-march=native`` build, or None (and one warning per process) when it cannot be had."""
    global _default, _default_error, _warned
    with _lock:
        if _default is not None:
            return _default
        if _default_error is not None:
            return None
    reason = None
    lib = None
    if _switched_off("HF_HYBRID_NATIVE"):
        reason = "disabled by HF_HYBRID_NATIVE=0"
    else:
        try:
            lib = load()
        except NativeBuildError as err:
            reason = str(err)
        except Exception as err:  # available() must never raise: anything unexpected means "use torch"
            reason = f"{type(err).__name__}: {err}"
    with _lock:
        if lib is not None:
            _default = lib
            return lib
        _default_error = reason
        if not _warned:
            _warned = True
            logger.warning(
                "The native CPU expert kernel is unavailable (%s); the CPU lane uses the torch path.", reason
            )
    return None


def _switched_off(name: str) -> bool:
    """Whether the environment variable ``name`` says 0 / false / no / off."""
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def available() -> bool:
    """Whether the native kernel can run here (built and loaded on first call; never raises)."""
    return _default_library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True or was not asked yet)."""
    return _default_error


def isa() -> str:
    """The instruction set of the default build (``"avx512_bf16"``, ``"avx512f"``, ``"avx2"``,
    ``"scalar"``), or ``"unavailable"``."""
    lib = _default_library()
    return lib.isa if lib is not None else "unavailable"


def _reset_for_tests() -> None:
    """Forget loaded libraries, the cached availability and the warning flag (tests only)."""
    global _default, _default_error, _warned
    with _lock:
        _libraries.clear()
        _default = None
        _default_error = None
        _warned = False


@functools.lru_cache(maxsize=1)
def _silu_classes() -> tuple[type, ...]:
    # asked once per CPU job of every layer step: look the classes up once
    classes: list[type] = [torch.nn.SiLU]
    try:
        from transformers.activations import ACT2CLS

        for name in ("silu", "swish"):
            cls = ACT2CLS.get(name)
            cls = cls[0] if isinstance(cls, tuple) else cls
            if isinstance(cls, type):
                classes.append(cls)
    except Exception:  # an older or newer transformers without ACT2CLS: nn.SiLU still counts
        pass
    return tuple(classes)


def is_silu(act_fn: object) -> bool:
    """Whether ``act_fn`` is SiLU: ``nn.SiLU``, transformers' ``ACT2FN["silu"]``/``["swish"]``, or ``F.silu``."""
    return act_fn is F.silu or isinstance(act_fn, _silu_classes())


def supports(dtype: torch.dtype, act_fn: object) -> bool:
    """Whether the native path can run experts of ``dtype`` with ``act_fn`` here (bf16/fp32, SiLU, and
    the library available)."""
    return dtype in (torch.bfloat16, torch.float32) and is_silu(act_fn) and available()


# ------------------------------------------------------------------------------------------------------
# jobs and the reference


@dataclass
class ExpertJob:
    """One gated MLP of a layer step.

    Attributes:
        gate_up: ``[2*I, H]``, gate rows then up rows (as stored); rows must be contiguous (stride 1).
        down: ``[H, I]``, rows contiguous.
        rows: ``r``: use gate rows ``[0, r)``, up rows ``[I, I + r)`` and down columns ``[0, r)``; None = I.
        tokens: int64 ``[n]`` rows of ``x`` routed to this job (repeats allowed), None = every row.
        weights: routing weight per selected token (any float dtype; bf16 weights round the product to
            bf16 as torch does), None = 1. With ``weight_index``: a 1-D bf16 or fp32 tensor of routing
            weights from which each selected token's is picked.
        weight_index: int64 ``[n]`` position in ``weights`` of each selected token's weight, None = the
            n weights in order. The kernel reads the weights only when it runs, so a job can be packed
            (:meth:`NativeExpertLane.pack`) while a device copy still fills ``weights``.
        partial: this job is one part of a sum split across lanes: its down output is not rounded to bf16.
    """

    gate_up: Tensor
    down: Tensor
    rows: int | None = None
    tokens: Tensor | None = None
    weights: Tensor | None = None
    partial: bool = False
    weight_index: Tensor | None = None


def torch_reference(x: Tensor, jobs: Sequence[ExpertJob], out: Tensor) -> Tensor:
    """What :meth:`NativeExpertLane.run` computes, with torch ops (the fallback path and the tests' oracle).

    ``out`` (fp32 ``[T, H]``) is added to and returned.
    """
    for job in jobs:
        inter = job.gate_up.shape[0] // 2
        r = inter if job.rows is None else int(job.rows)
        xs = x if job.tokens is None else x[job.tokens]
        if r == 0 or xs.shape[0] == 0:
            continue
        h = F.silu(F.linear(xs, job.gate_up[:r])) * F.linear(xs, job.gate_up[inter : inter + r])
        down = job.down[:, :r]
        if job.partial and h.dtype != torch.float32:
            y = F.linear(h.float(), down.float())  # a part of a sum: the down output stays fp32
        else:
            y = F.linear(h, down)
        if job.weights is not None:
            w = job.weights if job.weight_index is None else job.weights.reshape(-1)[job.weight_index]
            w = w.to(torch.float32) if job.partial else w
            y = y * w[:, None]
        if job.tokens is None:
            out += y.float()
        else:
            out.index_add_(0, job.tokens, y.float())
    return out


# ------------------------------------------------------------------------------------------------------
# the lane


@dataclass
class PackedJobs:
    """A layer step's jobs laid out for the kernel (:meth:`NativeExpertLane.pack`); ``keep`` holds every
    tensor the layout points to, so none is freed before the call."""

    buffer: ctypes.Array
    count: int
    x: Tensor
    out: Tensor
    dtype_code: int
    keep: list[Tensor]

    def call_args(self) -> tuple:
        """The arguments of ``hf_lane_run`` after the pool handle."""
        ntokens, hidden = self.x.shape
        return (
            ctypes.addressof(self.buffer),
            self.count,
            self.x.data_ptr(),
            ntokens,
            hidden,
            self.dtype_code,
            self.out.data_ptr(),
        )


class NativeExpertLane:
    """A persistent pool of ``threads`` threads (the calling thread included) that runs layer steps.

    Workers sleep on a condition variable between calls. One pool serves one call at a time: concurrent
    :meth:`run` calls from several Python threads are serialised inside the library. :meth:`start` hands a
    call to the pool's leader thread and returns at once; :meth:`wait` sleeps until it is done.

    Args:
        threads: threads taking part in a call, the calling thread included (>= 1).
        library: a loaded variant (:func:`load`); default: the ``-march=native`` build.
    """

    def __init__(self, threads: int, library: Library | None = None) -> None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        if library is None:
            library = _default_library()
            if library is None:
                raise NativeBuildError(f"the native CPU expert kernel is unavailable: {_default_error}")
        self.library = library
        self._cond = threading.Condition()
        self._active = 0
        self._closed = False
        self._pid = os.getpid()
        self._async_lock = threading.Lock()
        self._inflight: PackedJobs | None = None  # started, not yet waited for (keeps its tensors alive)
        handle = library.dll.hf_lane_create(threads)
        if not handle:
            raise NativeBuildError(f"could not start a pool of {threads} threads")
        self._handle: int | None = handle
        self.threads = int(library.dll.hf_lane_threads(handle))
        self._amx_min_tokens = DEFAULT_AMX_MIN_TOKENS
        if self.library.amx and _switched_off("HF_HYBRID_AMX"):
            self.configure(amx_min_tokens=0)

    @property
    def isa(self) -> str:
        """The instruction set of this pool's library."""
        return self.library.isa

    @property
    def amx(self) -> bool:
        """Whether bf16 jobs with at least :attr:`amx_min_tokens` tokens run on AMX tiles in this pool."""
        return self.library.amx and self._amx_min_tokens > 0

    @property
    def amx_min_tokens(self) -> int:
        """Tokens per job from which bf16 jobs run on AMX tiles (where usable); 0 = never."""
        return self._amx_min_tokens

    def configure(
        self,
        *,
        barrier_spin_us: int | None = None,
        prefetch_bytes: int | None = None,
        dpbf16: bool | None = None,
        min_bytes_per_thread: int | None = None,
        idle_spin_us: int | None = None,
        k_block: int | None = None,
        amx_min_tokens: int | None = None,
        wait_spin_us: int | None = None,
        short_row_bytes: int | None = None,
    ) -> None:
        """Tune the pool (benchmarks): spin before sleeping at the phase barrier (default 50 us), software
        prefetch distance (default 1024 bytes), use of VDPBF16PS where compiled in (default off: no gain
        was measured at 1-8 tokens), weight bytes
        per thread below which fewer threads take part (default 256 KiB), spin after a call before a
        worker sleeps (default 0), k block in elements (a multiple of 32; default 0 = sized so that a
        block's activations fit in 256 KiB, at least 1024; it also sets the AMX path's k block), tokens
        per job from which bf16 jobs run on AMX tiles where usable (default 16; 0 = never), spin in
        :meth:`wait` before sleeping (default 0), weight rows of at most ``short_row_bytes`` prefetched a
        pass of rows ahead rather than along the row (default 16 KiB; 0 = every row along itself).
        ``idle_spin_us`` also applies to the leader thread that makes :meth:`start`'s calls."""
        settings = [
            (_OPT_BARRIER_SPIN_US, barrier_spin_us),
            (_OPT_PREFETCH, prefetch_bytes),
            (_OPT_DPBF16, None if dpbf16 is None else int(bool(dpbf16))),
            (_OPT_MIN_BYTES, min_bytes_per_thread),
            (_OPT_IDLE_SPIN_US, idle_spin_us),
            (_OPT_K_BLOCK, k_block),
            (_OPT_AMX_MIN_TOKENS, amx_min_tokens),
            (_OPT_WAIT_SPIN_US, wait_spin_us),
            (_OPT_SHORT_ROW, short_row_bytes),
        ]
        handle = self._acquire()
        try:
            for option, value in settings:
                if value is None:
                    continue
                rc = self.library.dll.hf_lane_configure(handle, option, int(value))
                if rc != 0:
                    raise ValueError(f"bad setting {value!r}: {self.library.strerror(rc)}")
                if option == _OPT_AMX_MIN_TOKENS:
                    self._amx_min_tokens = int(value)
        finally:
            self._release()

    def last_stats(self) -> dict[str, float]:
        """The last call as the calling thread saw it: ``total_us``, ``phase1_us`` (gate/up, until the
        barrier opened), ``phase2_us`` (down), ``threads`` that took part, weight ``bytes`` read,
        ``amx_jobs`` computed on AMX tiles."""
        values = (ctypes.c_double * 6)()
        handle = self._acquire()
        try:
            self.library.dll.hf_lane_last_stats(handle, values)
        finally:
            self._release()
        return dict(zip(("total_us", "phase1_us", "phase2_us", "threads", "bytes", "amx_jobs"), values))

    def _acquire(self) -> int:
        with self._cond:
            if self._closed or self._handle is None:
                raise RuntimeError("the native expert lane is closed")
            if os.getpid() != self._pid:
                # a forked child has the parent's memory but not its threads: start a pool of its own
                # (the parent's pool structure is left alone; it belongs to the parent)
                handle = self.library.dll.hf_lane_create(self.threads)
                if not handle:
                    raise NativeBuildError("could not start a pool in the forked process")
                self._handle, self._pid = handle, os.getpid()
            self._active += 1
            return self._handle

    def _release(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def run(self, x: Tensor, jobs: Sequence[ExpertJob], out: Tensor) -> Tensor:
        """Add ``sum_jobs weights * down(silu(gate(x_tok)) * up(x_tok))`` into ``out`` and return it.

        Args:
            x: ``[T, H]`` activations on CPU, contiguous, bf16 or fp32.
            jobs: the gated MLPs of the step; weights in ``x``'s dtype.
            out: ``[T, H]`` fp32, contiguous, CPU; added to (zero it first for a plain result).

        Raises ``ValueError`` for bad shapes, dtypes, devices, layouts or token indices.
        """
        return self.run_packed(self.pack(x, jobs, out))

    def pack(self, x: Tensor, jobs: Sequence[ExpertJob], out: Tensor) -> PackedJobs:
        """Validate ``jobs`` against ``x`` and ``out`` and lay them out for the kernel, without reading any
        tensor's values: the executor packs a layer step's jobs on its feeding thread while the
        activations and routing weights are still crossing PCIe, and the CPU lane's thread then only calls
        :meth:`run_packed` (no Python work of its own that would wait for the interpreter lock)."""
        dtype_code = _check_x_out(x, out)
        ntokens, hidden = x.shape
        keep: list[Tensor] = [x, out]
        packed = bytearray(_JOB_PACK.size * max(1, len(jobs)))
        for n, job in enumerate(jobs):
            _JOB_PACK.pack_into(
                packed, n * _JOB_PACK.size, *_job_fields(job, n, x.dtype, ntokens, hidden, keep)
            )
        return PackedJobs(
            (ctypes.c_char * len(packed)).from_buffer(packed), len(jobs), x, out, dtype_code, keep
        )

    def pack_bytes(
        self, x: Tensor, job_bytes: Sequence[bytes], out: Tensor, keep: Sequence[Tensor]
    ) -> PackedJobs:
        """:meth:`pack` for jobs packed already, one by one, by :func:`packed_job` (a decode step's jobs repeat
        from step to step: the executor keeps their bytes). ``keep``: the tensors the jobs point to that the
        caller does not hold for the call's duration otherwise."""
        dtype_code = _check_x_out(x, out)
        packed = bytearray(b"".join(job_bytes) or bytes(_JOB_PACK.size))
        return PackedJobs(
            (ctypes.c_char * len(packed)).from_buffer(packed),
            len(job_bytes),
            x,
            out,
            dtype_code,
            [x, out, *keep],
        )

    def start(self, packed: PackedJobs, *, zero_out: bool = False) -> None:
        """Start jobs packed by :meth:`pack` on the pool's leader thread and return at once; :meth:`wait`
        returns the result. The caller (the executor's feeding thread) starts a decode step's CPU work
        itself: no Python thread wakes between the start and the kernel, or between its end and the
        caller's join. ``zero_out``: the leader zeroes ``out`` first. The tensors must hold their values
        now. A call started earlier and not yet waited for is waited for first (its result dropped).

        Raises ``ValueError`` when the library refuses the call."""
        with self._async_lock:
            self._settle_inflight()
            handle = self._acquire()
            rc = self.library.dll.hf_lane_start(handle, *packed.call_args(), int(bool(zero_out)))
            if rc != 0:
                self._release()
                raise ValueError(
                    f"native expert lane refused the call: {self.library.strerror(rc)} (code {rc})"
                )
            self._inflight = packed

    def wait(self) -> tuple[Tensor, float, float]:
        """Sleep until the call :meth:`start` made is done and return ``(out, started, ended)``: the
        leader's times around it in seconds, on ``time.perf_counter``'s clock (CLOCK_MONOTONIC). The wait
        returns to Python every few milliseconds, so a Ctrl-C interrupts it (the call keeps running and is
        collected by the next :meth:`start` or :meth:`wait`). Raises ``RuntimeError`` if nothing was started,
        ``ValueError`` if the library refused the call."""
        with self._async_lock:
            self._forget_parents_call()
            if self._inflight is None:
                raise RuntimeError("no call was started on this native expert lane")
            return self._collect()

    def _forget_parents_call(self) -> None:
        if os.getpid() != self._pid:
            self._inflight = None  # a forked child: the call is the parent's, in the parent's pool

    def _settle_inflight(self) -> None:
        """Wait for a started call nobody waited for and drop its result (under ``_async_lock``)."""
        self._forget_parents_call()
        if self._inflight is not None:
            try:
                self._collect()
            except ValueError:
                pass  # the dropped call's own failure was never asked for

    def _collect(self) -> tuple[Tensor, float, float]:
        times = (ctypes.c_double * 2)()
        while True:
            rc = self.library.dll.hf_lane_wait(self._handle, _WAIT_SLICE_US, times)
            if rc != _PENDING:
                break
        packed, self._inflight = self._inflight, None
        self._release()
        if rc == _ERR_IDLE:  # collected already (an interrupt between the library's return and ours)
            return packed.out, 0.0, 0.0
        self._raise_for(rc, packed.x.shape[0])
        return packed.out, times[0] * 1e-6, times[1] * 1e-6

    def _raise_for(self, rc: int, ntokens: int) -> None:
        if rc == 0:
            return
        message = self.library.strerror(rc)
        if rc == _ERR_TOKEN:
            raise ValueError(
                f"a job's token index (in [0, {ntokens})) or routing-weight index is out of range: {message}"
            )
        raise ValueError(f"native expert lane refused the call: {message} (code {rc})")

    def run_packed(self, packed: PackedJobs) -> Tensor:
        """Run jobs packed by :meth:`pack` (the tensors they point to must hold their values by now)."""
        handle = self._acquire()
        try:
            rc = self.library.dll.hf_lane_run(handle, *packed.call_args())
        finally:
            self._release()
        self._raise_for(rc, packed.x.shape[0])
        return packed.out

    def close(self) -> None:
        """Stop the pool's threads (waits for a call in progress); calling it again does nothing."""
        with self._async_lock:
            if not self._closed:
                self._settle_inflight()
        with self._cond:
            if self._closed:
                return
            self._closed = True
            while self._active:
                self._cond.wait()
            handle, self._handle = self._handle, None
        if handle and os.getpid() == self._pid:
            self.library.dll.hf_lane_destroy(handle)

    def __enter__(self) -> NativeExpertLane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: module globals may be gone already
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"NativeExpertLane(threads={self.threads}, isa={self.isa!r}, amx={self.amx}, {state})"


def _check_x_out(x: Tensor, out: Tensor) -> int:
    if not isinstance(x, Tensor) or not isinstance(out, Tensor):
        raise ValueError("x and out must be torch tensors")
    if not (x.is_cpu and out.is_cpu):
        raise ValueError(f"x and out must be on the CPU, got {x.device} and {out.device}")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPE_CODES:
        raise ValueError(f"x must be bf16 or fp32, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    if out.dtype != torch.float32 or out.shape != x.shape or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous fp32 tensor of x's shape {tuple(x.shape)}, got {out.dtype} {tuple(out.shape)}"
        )
    if x.shape[1] == 0:
        raise ValueError("x has hidden size 0")
    return _DTYPE_CODES[x.dtype]


_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def _matrix(t: object, name: str, n: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(rows, columns, row stride, data pointer) of a weight matrix, validated."""
    if not isinstance(t, Tensor) or t.dim() != 2:
        raise ValueError(f"job {n}: {name} must be a 2-D tensor")
    if not t.is_cpu:
        raise ValueError(f"job {n}: {name} must be on the CPU, got {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"job {n}: {name} is {t.dtype} but x is {dtype}")
    rows, cols = t.shape
    row_stride, col_stride = t.stride()
    if (col_stride != 1 and cols > 1) or (row_stride < cols and rows > 1):
        raise ValueError(f"job {n}: {name} rows must be contiguous (strides {t.stride()})")
    return rows, cols, max(row_stride, cols), t.data_ptr()


def packed_job(job: ExpertJob, dtype: torch.dtype, ntokens: int, hidden: int) -> bytes:
    """``job`` validated against activations of ``dtype`` and shape ``[ntokens, hidden]`` and packed as one
    ``hf_job`` (for :meth:`NativeExpertLane.pack_bytes`). The bytes hold the addresses of the job's
    tensors: valid while those tensors live and keep their layout. Raises ``ValueError`` as :meth:`pack`."""
    return _JOB_PACK.pack(*_job_fields(job, 0, dtype, ntokens, hidden, []))


def _job_fields(
    job: ExpertJob, n: int, dtype: torch.dtype, ntokens: int, hidden: int, keep: list[Tensor]
) -> tuple:
    """The values of one ``hf_job``, in field order, after validating the job against x."""
    inter2, width, ld_gu, gate_ptr = _matrix(job.gate_up, "gate_up", n, dtype)
    d_rows, d_cols, ld_down, down_ptr = _matrix(job.down, "down", n, dtype)
    if inter2 % 2 or width != hidden:
        raise ValueError(f"job {n}: gate_up {tuple(job.gate_up.shape)} must be [2*I, H] with H = {hidden}")
    inter = inter2 // 2
    if d_rows != hidden or d_cols != inter:
        raise ValueError(f"job {n}: down {tuple(job.down.shape)} must be [H, I] = [{hidden}, {inter}]")
    r = inter if job.rows is None else job.rows
    if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r <= inter:
        raise ValueError(f"job {n}: rows must be an int in [0, {inter}], got {job.rows!r}")
    keep.append(job.gate_up)
    keep.append(job.down)

    tok = job.tokens
    if tok is None:
        ntok, tokens_ptr = ntokens, 0
    else:
        if not isinstance(tok, Tensor) or tok.dim() != 1 or tok.dtype != torch.int64:
            raise ValueError(f"job {n}: tokens must be a 1-D int64 tensor")
        if not tok.is_cpu or not tok.is_contiguous():
            raise ValueError(f"job {n}: tokens must be a contiguous CPU tensor")
        ntok, tokens_ptr = tok.shape[0], tok.data_ptr()
        keep.append(tok)

    w = job.weights
    weights_ptr = weight_bf16 = weight_dtype = index_ptr = nweights = 0
    if job.weight_index is not None:
        index_ptr, nweights = _weight_index(job, n, ntok, keep)
        weight_bf16 = int(w.dtype == torch.bfloat16)
        weight_dtype = _DTYPE_CODES[w.dtype]
        weights_ptr = w.data_ptr()
        keep.append(w)
    elif w is not None:
        if not isinstance(w, Tensor) or not w.is_floating_point():
            raise ValueError(f"job {n}: weights must be a floating-point tensor")
        if not w.is_cpu:
            raise ValueError(f"job {n}: weights must be on the CPU, got {w.device}")
        if w.numel() != ntok or w.dim() not in (1, 2) or (w.dim() == 2 and w.shape[1] != 1):
            raise ValueError(
                f"job {n}: weights must have one value per selected token ({ntok}), got {tuple(w.shape)}"
            )
        weight_bf16 = int(w.dtype == torch.bfloat16)
        if w.dtype not in _DTYPE_CODES:
            w = w.to(torch.float32)  # fp16 or fp64: the kernel reads fp32 and bf16
        if not w.is_contiguous():
            w = w.contiguous()
        weight_dtype = _DTYPE_CODES[w.dtype]
        weights_ptr = w.data_ptr()
        keep.append(w)

    up_ptr = gate_ptr + inter * ld_gu * job.gate_up.element_size()
    return (
        gate_ptr,
        up_ptr,
        down_ptr,
        tokens_ptr,
        weights_ptr,
        index_ptr,
        ld_gu,
        ld_down,
        r,
        ntok,
        nweights,
        int(dtype == torch.bfloat16),
        weight_bf16,
        int(bool(job.partial)),
        0,
        weight_dtype,
        0,
    )


def _weight_index(job: ExpertJob, n: int, ntok: int, keep: list[Tensor]) -> tuple[int, int]:
    """(pointer, number of weights) of a job whose weights are picked by ``weight_index``, validated
    without reading the weights' values (they may still be arriving)."""
    index, w = job.weight_index, job.weights
    if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype != torch.int64:
        raise ValueError(f"job {n}: weight_index must be a 1-D int64 tensor")
    if not index.is_cpu or not index.is_contiguous() or index.shape[0] != ntok:
        raise ValueError(f"job {n}: weight_index must be a contiguous CPU tensor of {ntok} positions")
    if not isinstance(w, Tensor) or w.dtype not in _DTYPE_CODES or not w.is_cpu or not w.is_contiguous():
        raise ValueError(f"job {n}: with weight_index, weights must be a contiguous bf16 or fp32 CPU tensor")
    keep.append(index)
    return index.data_ptr(), w.numel()
