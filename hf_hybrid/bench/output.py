"""What a bench run reports: the derived columns of each row, the markdown table and the JSON file."""

from __future__ import annotations

import contextlib
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from ..units import format_bytes
from .bounds import finite, row_bounds
from .settings import BenchSettings

TABLE_COLUMNS = (
    "engine",
    "prompt",
    "new",
    "prefill tok/s",
    "decode tok/s",
    "end-to-end s",
    "prefill % of bound",
    "prefill % of CPU+PCIe bound",
    "decode % of bound",
    "decode % of native-lane bound",
    "speedup vs accelerate (e2e)",
    "note",
)


def projected_e2e(row: dict, settings: BenchSettings) -> float | None:
    """End-to-end seconds of the headline workload: measured for the rows that ran it, else projected as
    t_prefill (not scaled with the prompt, which favours the baseline) + (N-1) * t_decode_step."""
    if row.get("status") != "ok":
        return None
    if row["prompt"] == settings.prompt and row["new_tokens"] == settings.new_tokens:
        return row.get("e2e_s")
    step = row.get("decode_step_s")
    if settings.new_tokens > 1 and step is None:
        return None
    return row["prefill_s"] + (settings.new_tokens - 1) * (step or 0.0)


def _fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.1f}"
    return f"{value:.3f}"


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else (f"{value:.2f}" if value < 100 else f"{value:,.0f}")


def plan_summary(plan: dict | None) -> dict | None:
    """``{home: {"units": n, "bytes": b}}`` of a plan's ``to_dict()``; None without units."""
    if not isinstance(plan, dict) or not plan.get("units"):
        return None
    homes: dict[str, dict[str, int]] = {}
    for unit in plan["units"]:
        if not isinstance(unit, dict):
            continue
        home = str(unit.get("home", "?"))
        slot = homes.setdefault(home, {"units": 0, "bytes": 0})
        slot["units"] += 1
        slot["bytes"] += int(unit.get("bytes", unit.get("nbytes", 0)) or 0)
    return homes


def _row_note(row: dict, settings: BenchSettings) -> str:
    parts: list[str] = []
    if row["status"] == "skipped":
        return f"skipped: {row.get('reason', '')}"
    if row["status"] == "error":
        return f"error: {row.get('error', '')}"
    if (row["prompt"], row["new_tokens"]) != (settings.prompt, settings.new_tokens):
        parts.append(
            f"shorter workload; e2e projected to {settings.prompt}+{settings.new_tokens} for the speedup "
            "(measured prefill time, not scaled up: favours this baseline)"
        )
    predicted = row.get("predicted") or {}
    if predicted:
        pieces = [
            f"{label} {_fmt_rate(finite(predicted.get(key)))}"
            for key, label in (("prefill_tok_s", "prefill"), ("decode_tok_s", "decode"))
            if finite(predicted.get(key)) is not None
        ]
        if pieces:
            parts.append("plan predicts " + ", ".join(pieces) + " tok/s")
    summary = plan_summary(row.get("plan"))
    if summary:
        parts.append(
            "plan: "
            + ", ".join(
                f"{home} {format_bytes(v['bytes'])} ({v['units']})" for home, v in sorted(summary.items())
            )
        )
    if row.get("routing_stats_passed"):
        parts.append("given the measured routing (--routing-stats)")
    if row.get("plan_error"):
        parts.append(f"plan unreadable: {row['plan_error']}")
    lanes = row.get("lanes") or {}
    if lanes.get("host_gap_ms_per_layer") is not None:
        rate = lanes.get("cpu_lane_GBps")
        parts.append(
            f"host time per layer step {lanes['host_gap_ms_per_layer']:.2f} ms between steps + "
            f"{lanes.get('issue_ms_per_layer') or 0:.2f} ms issuing"
            + (f"; CPU lane {rate:.0f} GB/s" if rate else "")
            + (f" ({lanes['native_units']} native units)" if lanes.get("native_units") else "")
            + (
                f"; a streamed expert {lanes['stream_issue_us']:.0f} us to issue"
                f" ({lanes.get('stream_fetch_us') or 0:.0f} us its copy)"
                if lanes.get("stream_issue_us")
                else ""
            )
        )
    if row.get("gpu_peak_bytes"):
        parts.append(f"GPU peak {format_bytes(row['gpu_peak_bytes'])}")
    if row.get("load_s") is not None:
        parts.append(f"load {row['load_s']:.1f} s")
    if row.get("warning"):
        parts.append(row["warning"])
    if row.get("close_error"):
        parts.append(f"close failed: {row['close_error']}")
    return "; ".join(parts)


def finish_rows(rows: list[dict], meta: dict, profile: Any, settings: BenchSettings) -> None:
    """Add each row's projected end-to-end time, bounds, % of bound, speedup vs accelerate and note."""
    hybrid = next((r for r in rows if r["engine"] == "hf_hybrid" and r["status"] == "ok"), None)
    plan = hybrid.get("plan") if hybrid else None
    hybrid_counts = (hybrid["prompt"], hybrid["new_tokens"]) if hybrid else None
    for row in rows:
        row["e2e_projected_s"] = projected_e2e(row, settings)
        bounds = (
            row_bounds(
                row,
                meta,
                profile,
                settings.budget_bytes,
                settings.batch,
                row.get("plan") or plan,
                hybrid_counts,
            )
            if row["status"] == "ok"
            else None
        )
        row["bounds"] = bounds
        for kind, key in (
            ("prefill", "prefill"),
            ("prefill", "prefill_cpu_pcie"),
            ("decode", "decode"),
            ("decode", "decode_native"),
        ):
            bound = (bounds or {}).get(f"{key}_bound_tok_s")
            measured = row.get(f"{kind}_tok_s")
            row[f"{key}_bound_tok_s"] = bound
            row[f"{key}_pct_of_bound"] = 100.0 * measured / bound if bound and measured else None
    reference = next((r for r in rows if r["engine"] == "accelerate" and r.get("e2e_projected_s")), None)
    for row in rows:
        mine = row.get("e2e_projected_s")
        row["speedup_vs_accelerate"] = reference["e2e_projected_s"] / mine if reference and mine else None
        row["note"] = _row_note(row, settings)


def render_table(rows: list[dict], settings: BenchSettings, header: str) -> str:
    """The markdown table (one line of header text, then the table)."""
    lines = [header, "", "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        ok = row["status"] == "ok"
        speed = row.get("speedup_vs_accelerate")
        cells = [
            row["engine"],
            str(row["prompt"]),
            str(row["new_tokens"]),
            _fmt_rate(row.get("prefill_tok_s")) if ok else "-",
            _fmt_rate(row.get("decode_tok_s")) if ok else "-",
            _fmt_s(row.get("e2e_s")) if ok else "-",
            _fmt_pct(row.get("prefill_pct_of_bound")),
            _fmt_pct(row.get("prefill_cpu_pcie_pct_of_bound")),
            _fmt_pct(row.get("decode_pct_of_bound")),
            _fmt_pct(row.get("decode_native_pct_of_bound")),
            "-" if speed is None else f"{speed:.2f}x",
            row.get("note", ""),
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as None, paths and unknown objects as strings (``to_dict`` used)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    return str(value)


def check_destination(path: Path) -> None:
    """Raise ``ValueError`` when ``path`` is a symbolic link: results are never written through one."""
    if Path(path).is_symlink():
        raise ValueError(f"refusing to write the bench result to {path}: it is a symbolic link")


def write_result(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temporary file in the same directory, then ``os.replace``.

    A symlink at ``path`` is refused (``ValueError``), never followed or replaced. A new file gets mode
    0o600; an existing one keeps its mode. Missing parent directories are created.
    """
    path = Path(path)
    check_destination(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        mode = 0o600
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
