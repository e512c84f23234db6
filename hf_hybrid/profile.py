"""The machine's measured rates, as the planner sees them: plain data, no torch.

``HardwareProfile`` holds the rates; defaults are conservative figures for a PCIe 4/5 server so that
planning works before anything was measured. Measuring them is :mod:`hf_hybrid.measure`'s job; this
module also reads and writes the JSON cache and formats a profile for people.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

logger = logging.getLogger(__name__)

TOKEN_COUNTS = (1, 2, 4, 8, 16, 64, 512)
#: Bumped when a measurement is added, so a cached profile without it is measured again rather than
#: planned with (2: the CPU lane's own rates; 3: the native CPU lane's rates; 4: its prefill-sized jobs on AMX
#: tiles; 5: the feeding thread's time to issue one expert on the device lane; 6: the native lane's decode
#: rates measured on calls started and waited for as decode steps make them, with a pause between calls; 7:
#: the issue time of one expert of a one-token step, a CUDA graph replay).
PROFILE_FORMAT = 7
#: Token count of the CPU lane's prefill-sized measurement (one of TOKEN_COUNTS).
LANE_GEMM_TOKENS = 64
#: The CPU kernels a profile may choose (``hf_hybrid.kernels.cpu.METHODS``, named here so that this module
#: needs no torch; a test keeps the two equal).
CPU_KERNELS = ("linear", "matmul_t", "onednn_packed")
# tables measured at every token count: a cache missing one of them would be interpolated past its data
_FULL_TABLES = ("cpu_gemv_bw", "cpu_gemm_flops", "cpu_kernel")
# fields keyed by token count: JSON turns their keys into strings, from_dict turns them back
_PER_TOKEN_KEYS = ("cpu_gemv_bw", "cpu_gemm_flops", "cpu_kernel", "cpu_method_bw", "cpu_native_bw")


@dataclass
class HardwareProfile:
    """Rates in bytes/s and FLOP/s. ``cpu_gemm_flops[m]`` and ``cpu_gemv_bw[m]`` are per token count m."""

    device: str = "cpu"
    dtype: str = "bfloat16"
    cpu_threads: int = 1
    dram_read_bw: float = 20e9
    # weight-read bandwidth of the CPU expert kernel per token count (bytes of weights / s)
    cpu_gemv_bw: dict[int, float] = field(default_factory=lambda: {m: 15e9 for m in TOKEN_COUNTS})
    # CPU matrix throughput per token count (FLOP/s)
    cpu_gemm_flops: dict[int, float] = field(default_factory=lambda: {m: 2e11 for m in TOKEN_COUNTS})
    # CPU weight-read bandwidth while a PCIe copy is in flight (they share DRAM)
    cpu_gemv_bw_during_copy: float = 12e9
    h2d_bw: float = 10e9  # pinned host -> device
    h2d_bw_during_cpu: float = 8e9
    gpu_mem_bw: float = 50e9  # device weight-read rate for GEMV
    gpu_flops: float = 1e12
    cpu_kernel: dict[int, str] = field(default_factory=lambda: {m: "linear" for m in TOKEN_COUNTS})
    measured: bool = False
    # every CPU method's weight-read rate per token count (bytes/s), to see how close the runners-up were
    cpu_method_bw: dict[int, dict[str, float]] = field(default_factory=dict)
    # the CPU lane as the executor runs it (a worker thread, one core left to the feeding thread): its
    # 1-token weight-read rate alone, and its FLOP rate at a prefill-sized job (64 tokens) alone and while
    # copies run. None in profiles measured before these existed (the cost model then assumes no loss).
    cpu_lane_gemv_bw: float | None = None
    cpu_lane_gemm_flops: float | None = None
    cpu_lane_gemm_flops_during_copy: float | None = None
    # the native CPU expert lane (one C call per layer step), as the executor runs it for decode-sized jobs:
    # its weight-read rate per token count alone, and at 1 token while copies run (with the copies' rate).
    # Empty/None where the native kernel is not available or in profiles measured before it existed.
    cpu_native_bw: dict[int, float] = field(default_factory=dict)
    cpu_native_bw_during_copy: float | None = None
    h2d_bw_during_native: float | None = None
    # the native lane on a prefill-sized job (LANE_GEMM_TOKENS tokens per expert) on AMX tiles, alone and
    # while copies run (FLOP/s): the lane the executor gives such jobs where it has AMX. None elsewhere.
    cpu_native_gemm_flops: float | None = None
    cpu_native_gemm_flops_during_copy: float | None = None
    # host seconds the feeding thread spends issuing one decode-sized expert on the device lane kernel by
    # kernel (launches of its gather, gated MLP, weighting and sum), resident and streamed (its copy and the
    # wait for it too): serial work on the thread that also starts every other lane. None in profiles
    # measured before.
    device_unit_issue_s: float | None = None
    streamed_unit_issue_s: float | None = None
    # the same for a whole expert of a one-token step, which replays a CUDA graph (hf_hybrid.expert_graphs):
    # its routing weight copied into a static buffer and the graph replayed. None before format 7.
    graph_unit_issue_s: float | None = None
    graph_streamed_issue_s: float | None = None

    def cpu_weight_bw(self, tokens: int) -> float:
        """Interpolated CPU weight-read rate at ``tokens`` tokens."""
        return _interp(self.cpu_gemv_bw, tokens)

    def native_bw(self, tokens: int) -> float:
        """Interpolated weight-read rate of the native CPU lane at ``tokens`` tokens (0 if not measured)."""
        return _interp(self.cpu_native_bw, tokens) if self.cpu_native_bw else 0.0

    def cpu_flops(self, tokens: int) -> float:
        """Interpolated CPU FLOP rate at ``tokens`` tokens."""
        return _interp(self.cpu_gemm_flops, tokens)

    def to_dict(self) -> dict:
        """JSON-able form (keys of per-token tables become strings)."""
        data = asdict(self)
        for key in _PER_TOKEN_KEYS:
            data[key] = {str(k): v for k, v in data[key].items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> HardwareProfile:
        """Inverse of :meth:`to_dict`, checked with :meth:`validate` (``ValueError`` naming the field).

        Unknown keys are ignored and missing ones take their defaults, so older saved plans still load.
        """
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in _PER_TOKEN_KEYS:
            if key in kwargs:
                table = kwargs[key]
                if not isinstance(table, dict):
                    raise ValueError(f"{key} must be a table keyed by token count, not {table!r}")
                try:
                    kwargs[key] = {int(k): v for k, v in table.items()}
                except ValueError:
                    raise ValueError(f"{key} has keys that are not token counts: {sorted(table)}") from None
        profile = cls(**kwargs)
        profile.validate()
        return profile

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field a planner could not use.

        Rates must be positive finite numbers, the tables measured at every token count must have all of
        ``TOKEN_COUNTS``, and CPU kernel names must be ones this version knows: a bad value otherwise
        surfaces much later as a division by zero or a type error naming neither the profile nor a fix.
        """
        for f in fields(self):
            value, name = getattr(self, f.name), f.name
            if name in ("device", "dtype"):
                if not isinstance(value, str) or not value:
                    raise ValueError(f"{name} must be a non-empty string, not {value!r}")
            elif name == "measured":
                if not isinstance(value, bool):
                    raise ValueError(f"measured must be true or false, not {value!r}")
            elif name == "cpu_threads":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"cpu_threads must be a whole number of at least 1, not {value!r}")
            elif isinstance(value, dict) or f.default_factory is not MISSING:
                _check_table(name, value)
            elif value is not None or f.default is not None:
                # a rate; optional ones (default None) are None in profiles measured before they existed
                _check_rate(name, value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_rate(name: str, value) -> None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, not {value!r}")


def _check_table(name: str, table) -> None:
    """Check a table keyed by token count: its keys, and its rates or CPU kernel names."""
    if not isinstance(table, dict):
        raise ValueError(f"{name} must be a table keyed by token count, not {table!r}")
    counts = sorted(table, key=str)
    if not set(counts) <= set(TOKEN_COUNTS) or (name in _FULL_TABLES and set(counts) != set(TOKEN_COUNTS)):
        raise ValueError(f"{name} has token counts {counts}, this version measures {list(TOKEN_COUNTS)}")
    for m, value in table.items():
        if name == "cpu_kernel":
            if value not in CPU_KERNELS:
                raise ValueError(f"{name}[{m}] is {value!r}, not one of {', '.join(CPU_KERNELS)}")
        elif name == "cpu_method_bw":
            if not isinstance(value, dict):
                raise ValueError(f"{name}[{m}] must be a table keyed by CPU kernel, not {value!r}")
            for method, rate in value.items():
                if method not in CPU_KERNELS:
                    raise ValueError(f"{name}[{m}] names {method!r}, not one of {', '.join(CPU_KERNELS)}")
                _check_rate(f"{name}[{m}][{method}]", rate)
        else:
            _check_rate(f"{name}[{m}]", value)


def _interp(table: dict[int, float], tokens: int) -> float:
    points = sorted(table)
    if tokens <= points[0]:
        return table[points[0]]
    for lo, hi in zip(points, points[1:]):
        if tokens <= hi:
            frac = (tokens - lo) / (hi - lo)
            return table[lo] + frac * (table[hi] - table[lo])
    return table[points[-1]]


def default_profile(device: str = "cpu") -> HardwareProfile:
    """Figures to plan with before measuring: a GPU server if ``device`` is CUDA, else the CPU standing in."""
    if device.startswith("cuda"):
        return HardwareProfile(
            device=device,
            cpu_threads=16,
            dram_read_bw=100e9,
            cpu_gemv_bw={1: 76e9, 2: 85e9, 4: 85e9, 8: 82e9, 16: 80e9, 64: 60e9, 512: 40e9},
            cpu_gemm_flops={1: 0.15e12, 2: 0.3e12, 4: 0.6e12, 8: 1.2e12, 16: 2e12, 64: 3.5e12, 512: 2.9e12},
            cpu_gemv_bw_during_copy=60e9,
            h2d_bw=50e9,
            h2d_bw_during_cpu=48e9,
            gpu_mem_bw=1.5e12,
            gpu_flops=600e12,
        )
    return HardwareProfile(device=device)


def _read_cache(path: Path) -> HardwareProfile | None:
    """The cached profile, or None when missing, unreadable, from an older layout or with a value a plan
    cannot use (one warning naming the file and the field; the caller then measures again)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        # a cache is written whole by this version: a missing field would silently take a default rate
        missing = [f.name for f in fields(HardwareProfile) if f.name not in data]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        profile = HardwareProfile.from_dict(data)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        logger.warning("Ignoring unusable hardware profile cache %s (%s); measuring again.", path, err)
        return None
    return profile


def _write_cache(path: Path, profile: HardwareProfile) -> None:
    """Write the cache with :func:`write_private_file`; a failure is a warning, never an error."""
    try:
        write_private_file(path, json.dumps(profile.to_dict(), indent=2))
    except OSError as err:
        # an unwritable cache costs a re-measurement next time, nothing more
        logger.warning("Could not write hardware profile cache %s (%s).", path, err)


def write_private_file(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, readable and writable by its owner only (mode 0o600).

    The text goes to a temporary file in the same directory, which then replaces ``path``
    (``os.replace``): a crash or a concurrent writer never leaves half a file, and the name of the
    temporary file cannot be guessed in advance. A symbolic link at ``path`` is refused with
    ``FileExistsError`` (an ``OSError``, as for any path that cannot be written) rather than replaced:
    whoever placed it meant the data to go elsewhere. Missing parent directories are created. Returns the
    path.
    """
    path = Path(path)
    if path.is_symlink():
        raise FileExistsError(
            f"refusing to write {path}: it is a symbolic link (remove it, or choose another path)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # mkstemp creates it 0o600 already; set explicitly so the promise holds whatever creates it
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def format_profile(p: HardwareProfile) -> str:
    """A readable table of ``p``: per token count the chosen CPU method and its rates, then the other rates."""
    methods = sorted({name for rates in p.cpu_method_bw.values() for name in rates})
    on_cuda = p.device.startswith("cuda")
    copy = "H2D (pinned)" if on_cuda else "Host-to-host (CPU stands in)"
    accel = "GPU" if on_cuda else "Accelerator (= CPU)"
    head = f"Hardware profile: device={p.device} dtype={p.dtype} cpu_threads={p.cpu_threads}"
    lines = [head + ("" if p.measured else " (defaults, not measured)"), ""]
    header = f"{'tokens':>6}  {'CPU method':<14} {'GB/s':>7} {'TFLOP/s':>8}"
    if methods:
        header += "   " + " ".join(f"{name + ' GB/s':>19}" for name in methods)
    lines += [header, "-" * len(header)]
    for m in sorted(p.cpu_gemv_bw):
        row = (
            f"{m:>6}  {p.cpu_kernel.get(m, '?'):<14} {p.cpu_gemv_bw[m] / 1e9:>7.1f} "
            f"{p.cpu_gemm_flops.get(m, float('nan')) / 1e12:>8.3f}"
        )
        if methods:
            rates = p.cpu_method_bw.get(m, {})
            row += "   " + " ".join(
                f"{rates[name] / 1e9:>19.1f}" if name in rates else f"{'-':>19}" for name in methods
            )
        lines.append(row)
    lines += [
        "",
        f"{'DRAM read':<34} {p.dram_read_bw / 1e9:>9.1f} GB/s",
        f"{copy + ' copy':<34} {p.h2d_bw / 1e9:>9.1f} GB/s",
        f"{'CPU kernel during copy (1 token)':<34} {p.cpu_gemv_bw_during_copy / 1e9:>9.1f} GB/s",
        f"{copy + ' copy during CPU kernel':<34} {p.h2d_bw_during_cpu / 1e9:>9.1f} GB/s",
        f"{accel + ' GEMV weight read':<34} {p.gpu_mem_bw / 1e9:>9.1f} GB/s",
        f"{accel + ' GEMM':<34} {p.gpu_flops / 1e12:>9.2f} TFLOP/s",
    ]
    m = LANE_GEMM_TOKENS
    if p.cpu_lane_gemv_bw:
        lines.append(f"{'CPU lane alone (1 token)':<34} {p.cpu_lane_gemv_bw / 1e9:>9.1f} GB/s")
    if p.cpu_lane_gemm_flops:
        lines.append(f"{f'CPU lane alone ({m} tokens)':<34} {p.cpu_lane_gemm_flops / 1e12:>9.2f} TFLOP/s")
    if p.cpu_lane_gemm_flops_during_copy:
        label = f"CPU lane during copy ({m} tokens)"
        lines.append(f"{label:<34} {p.cpu_lane_gemm_flops_during_copy / 1e12:>9.2f} TFLOP/s")
    dram = p.dram_read_bw or math.nan
    for tokens, rate in sorted(p.cpu_native_bw.items()):
        label = f"native CPU lane alone ({tokens} tok)"
        lines.append(f"{label:<34} {rate / 1e9:>9.1f} GB/s  ({100 * rate / dram:.0f}% of DRAM read)")
    if p.cpu_native_bw_during_copy and p.h2d_bw_during_native:
        both = p.cpu_native_bw_during_copy + p.h2d_bw_during_native
        lines.append(
            f"{'native CPU lane + copies at once':<34} {both / 1e9:>9.1f} GB/s  ({100 * both / dram:.0f}% of "
            f"DRAM read: CPU {p.cpu_native_bw_during_copy / 1e9:.1f} + copy {p.h2d_bw_during_native / 1e9:.1f})"
        )
    if p.cpu_native_gemm_flops:
        label = f"native CPU lane, AMX ({m} tokens)"
        lines.append(f"{label:<34} {p.cpu_native_gemm_flops / 1e12:>9.2f} TFLOP/s")
    if p.cpu_native_gemm_flops_during_copy:
        label = "native lane, AMX, during copy"
        lines.append(f"{label:<34} {p.cpu_native_gemm_flops_during_copy / 1e12:>9.2f} TFLOP/s")
    if p.device_unit_issue_s and p.streamed_unit_issue_s:
        lines.append(
            f"{'issuing one expert on the device':<34} {p.device_unit_issue_s * 1e6:>9.0f} us resident, "
            f"{p.streamed_unit_issue_s * 1e6:.0f} us streamed"
        )
    if p.graph_unit_issue_s and p.graph_streamed_issue_s:
        lines.append(
            f"{'  as a graph (one-token steps)':<34} {p.graph_unit_issue_s * 1e6:>9.0f} us resident, "
            f"{p.graph_streamed_issue_s * 1e6:.0f} us streamed"
        )
    return "\n".join(lines)
