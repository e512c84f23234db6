"""Make the figures of the docs: the lanes diagram and one bar chart per benchmark scenario.

    python scripts/make_figures.py                # writes docs/images/lanes.png and docs/images/<scenario>.png
    python scripts/make_figures.py --out /tmp/img --data docs/data

* ``lanes.png``: the planner (before loading) and the three lanes of one MoE layer step (at run time).
* ``<record>-budget.png``: throughput vs GPU budget (measured and predicted) for every record of a budget
  sweep (``hf-hybrid bench --budgets 4GiB,8GiB,...``).
* ``<name>-timeline.png``: every ``docs/data/<name>.trace.json`` written by ``model.trace()``, one row per
  lane (host forwards, CPU lane, PCIe copies, GPU).
* ``<parent>-<directory>-<scenario>.png`` for each ``--prefill-vs-prompt DIR``: prefill tok/s against
  prompt length from the bench records in DIR (one machine), with both prefill bounds and the baselines.
* ``<scenario>.png`` (e.g. ``s1.png``): prefill and decode tokens/s of every engine in every
  ``docs/data/*.json`` benchmark record of that scenario (records written by ``hf-hybrid bench --json``;
  files without ``rows``, such as hardware profiles, are skipped). The numbers are the records' own.

Runs offline. Needs matplotlib; without it, prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# fixed PNG metadata: regenerating unchanged figures gives identical files
PNG_METADATA = {"Software": None}

LANE_COLORS = {"gpu": "#4c72b0", "copy": "#dd8452", "cpu": "#55a868", "wait": "#c8c8c8"}
ENGINE_COLORS = {"hf_hybrid": "#4c72b0", "gpu": "#8c8c8c", "accelerate": "#dd8452", "cpu": "#55a868"}
ENGINE_LABELS = {
    "gpu": "all on GPU\n(outside budget)",
    "accelerate": "accelerate\noffload",
    "cpu": "CPU only",
}


# ---------------------------------------------------------------------------------------------- loading
def load_records(data_dir: Path) -> dict[str, list[tuple[str, dict]]]:
    """Benchmark records in ``data_dir`` grouped by scenario: {scenario: [(file stem, record), ...]}."""
    by_scenario: dict[str, list[tuple[str, dict]]] = {}
    for path in sorted(data_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"skipping {path.name}: {exc}", file=sys.stderr)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("rows"), list):
            continue  # not a bench record (e.g. a hardware profile)
        scenario = str(record.get("header", {}).get("scenario") or path.stem.split("-")[0])
        by_scenario.setdefault(scenario, []).append((path.stem, record))
    return by_scenario


def measured_rows(record: dict) -> list[dict]:
    """The rows of engines that ran, with both rates."""
    return [
        r
        for r in record["rows"]
        if r.get("status") == "ok"
        and r.get("prefill_tok_s") is not None
        and r.get("decode_tok_s") is not None
    ]


# ---------------------------------------------------------------------------------------------- figures
def _plain_axes(ax) -> None:
    """No top or right frame line."""
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _save_figure(plt, fig, path: Path, dpi: int, rect=None) -> None:
    """Lay out, write with fixed PNG metadata (unchanged figures give identical files) and close."""
    fig.tight_layout(**({} if rect is None else {"rect": rect}))
    fig.savefig(path, dpi=dpi, metadata=PNG_METADATA)
    plt.close(fig)


def lanes_figure(plt, path: Path) -> None:
    """The planner pipeline (top) and a timeline of the three lanes during one MoE layer step (bottom)."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig = plt.figure(figsize=(11, 6.4))
    top = fig.add_axes([0.02, 0.60, 0.96, 0.38])
    top.set_xlim(0, 100)
    top.set_ylim(0, 30)
    top.axis("off")

    def box(ax, x, y, w, h, text, color="#eef2f8", edge="#4c72b0", size=9):
        ax.add_patch(
            FancyBboxPatch(
                (x, y), w, h, boxstyle="round,pad=0.4,rounding_size=1.2", fc=color, ec=edge, lw=1.2
            )
        )
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)

    def arrow(ax, x0, y0, x1, y1):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=12, color="#444"))

    top.text(0, 29, "Before the first token: from_pretrained", fontsize=11, weight="bold", va="top")
    steps = [
        ("config.json\n+ family adapter", "families.for_config"),
        ("units\nattention, experts,\nMLP slices, router...", "units.describe_units"),
        ("hardware profile\nCPU / PCIe / GPU rates", "profile.load_or_measure"),
        ("plan: a home\nper unit under\ngpu_memory", "planner.plan"),
        ("load: each tensor\nstraight to its home", "loading.load_weights"),
        ("hooks + executor\nstock generate()", "hooks.attach"),
    ]
    w, gap = 13.5, 3.0
    for n, (label, where) in enumerate(steps):
        x = n * (w + gap) + 0.6
        highlight = where == "planner.plan"
        box(top, x, 9, w, 13, label, color="#fdf0e6" if highlight else "#eef2f8")
        top.text(x + w / 2, 5.5, where, ha="center", fontsize=7.5, family="monospace", color="#333")
        if n:
            arrow(top, x - gap + 0.2, 15.5, x - 0.2, 15.5)
    top.text(
        50,
        0.8,
        "homes: gpu (resident)  |  cpu (host memory, computed by the CPU lane)  |  "
        "stream (pinned host memory, copied over PCIe into a staging slot before use)",
        ha="center",
        fontsize=8.5,
        color="#333",
    )

    ax = fig.add_axes([0.14, 0.10, 0.83, 0.42])
    ax.set_title(
        "One MoE layer step: the three lanes run at once; the layer costs about the max of them",
        fontsize=11,
        weight="bold",
        loc="left",
    )
    lanes = ["CPU lane\n(worker thread)", "copy lane\n(CUDA side stream)", "GPU lane\n(current stream)"]
    # (lane index, start, length, label, color key) -- an illustration, not a measurement
    bars = [
        (2, 0.0, 1.2, "attention", "gpu"),
        (2, 1.2, 0.5, "router", "gpu"),
        (2, 1.7, 0.6, "x ->\nhost", "gpu"),
        (0, 1.7, 0.6, "wait", "wait"),
        (0, 2.3, 5.0, "host experts assigned to the CPU\n(weights read in place)", "cpu"),
        (1, 1.7, 2.5, "copy expert a\n-> slot 0", "copy"),
        (1, 4.2, 2.5, "copy expert b\n-> slot 1", "copy"),
        (1, 6.7, 0.6, "pre-\nfetch", "copy"),
        (2, 2.3, 1.4, "resident\nexperts", "gpu"),
        (2, 4.2, 0.5, "a", "gpu"),
        (2, 6.7, 0.5, "b", "gpu"),
        (2, 7.4, 0.5, "sum", "gpu"),
    ]
    for lane, start, length, label, color in bars:
        ax.barh(lane, length, left=start, height=0.62, color=LANE_COLORS[color], edgecolor="white")
        ax.text(
            start + length / 2,
            lane,
            label,
            ha="center",
            va="center",
            fontsize=7.5,
            color="black" if color == "wait" else "white",
        )
    ax.annotate(
        "", xy=(7.55, 1.68), xytext=(7.55, 0.32), arrowprops={"arrowstyle": "-|>", "color": "#444", "lw": 1}
    )
    ax.text(7.65, 1.0, "CPU results\nback to the device", fontsize=7.5, va="center")
    ax.text(
        8.05,
        2.0,
        "streamed attention / lm_head:\nthe next one is prefetched\nwhile this one computes",
        fontsize=7,
        va="center",
        color="#444",
    )
    ax.set_yticks(range(3), lanes, fontsize=9)
    ax.set_xlim(0, 9.8)
    ax.set_ylim(-0.6, 2.6)
    ax.set_xticks([])
    ax.set_xlabel(
        "time (illustrative, not to scale)\nper layer step, planner.assign_tokens sends each non-resident "
        "expert's tokens to the CPU lane or streams its weights to the GPU, whichever finishes sooner",
        fontsize=8.5,
    )
    _plain_axes(ax)
    fig.savefig(path, dpi=130, metadata=PNG_METADATA)
    plt.close(fig)


def run_label(stem: str, record: dict) -> str:
    """``2026-11-25 10:15, uniform routing`` for a record (its file stem when the header has no date)."""
    header = record.get("header", {})
    date = str(header.get("date") or stem)
    when = date[:16] if len(date) >= 16 else date
    label = f"{when}, {header.get('skew') or 'uniform'} routing"
    if "--routing-stats" in str(header.get("command", "")):
        label += ", planned with it"
    return label


def scenario_figure(plt, scenario: str, records: list[tuple[str, dict]], path: Path) -> bool:
    """Horizontal bars: prefill and decode tok/s of every engine of every run. False if nothing measured."""
    runs = [(run_label(stem, rec), rec, measured_rows(rec)) for stem, rec in records]
    runs = sorted((r for r in runs if r[2]), key=lambda r: str(r[1].get("header", {}).get("date", r[0])))
    if not runs:
        return False
    # one row per (run, engine), a gap between runs, the first run on top
    positions, labels, rows = [], [], []
    y = 0.0
    for label, _, run_rows in runs:
        for row in run_rows:
            engine = str(row.get("engine"))
            name = ENGINE_LABELS.get(engine, engine).replace("\n", " ")
            positions.append(y)
            labels.append(f"{name}  ({row.get('prompt')}+{row.get('new_tokens')})")
            rows.append((label, engine, row))
            y -= 1
        y -= 0.8
    height = 1.6 + 0.32 * len(rows) + 0.25 * len(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, height), sharey=True)
    for ax, key, title in (
        (axes[0], "prefill_tok_s", "prefill tokens/s"),
        (axes[1], "decode_tok_s", "decode tokens/s"),
    ):
        for ypos, (_, engine, row) in zip(positions, rows):
            value = float(row[key])
            ax.barh(ypos, value, height=0.8, color=ENGINE_COLORS.get(engine, "#999"), edgecolor="white")
            text = f" {value:,.0f}" if value >= 100 else f" {value:.3g}"
            ax.text(value, ypos, text, va="center", fontsize=7.5)
        ax.set_xscale("log")
        ax.set_xlabel(f"{title} (log scale)", fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.margins(x=0.15)
        _plain_axes(ax)
    axes[0].set_yticks(positions, labels, fontsize=8)
    # the run each block of rows belongs to, above its first row
    first = {}
    for ypos, (label, _, _) in zip(positions, rows):
        first.setdefault(label, ypos)
    for label, ypos in first.items():
        axes[0].annotate(
            label,
            xy=(0, ypos + 0.55),
            xycoords=("axes fraction", "data"),
            xytext=(-4, 0),
            textcoords="offset points",
            ha="right",
            va="bottom",
            fontsize=8,
            weight="bold",
        )
    header = runs[-1][1].get("header", {})
    title = (
        f"{scenario}: {header.get('description', '')} -- {header.get('device_name', header.get('device', ''))}, "
        f"GPU budget {header.get('gpu_memory', '?')}"
    )
    fig.suptitle(title, fontsize=10.5)
    fig.text(
        0.5,
        0.005,
        "measured by hf-hybrid bench (docs/data/*.json); in brackets: prompt + new tokens of that run "
        "(the slow baselines run a shorter workload)",
        ha="center",
        va="bottom",
        fontsize=7.5,
        color="#444",
    )
    _save_figure(plt, fig, path, 130, rect=(0, 0.03, 1, 0.97))
    return True


def prefill_length_figure(plt, records: list[tuple[str, dict]], path: Path) -> bool:
    """Prefill tok/s against prompt length (log-log): hf_hybrid, its PCIe-only and CPU+PCIe bounds, and the
    baselines at the prompts they ran, from bench records of one scenario on one machine (``--prefill-vs-
    prompt DIR``). False when fewer than two hf_hybrid prompt lengths were measured."""
    hybrid: dict[int, dict] = {}
    others: dict[str, list[tuple[int, float]]] = {}
    for _, record in records:
        for row in record.get("rows", []):
            if row.get("status") != "ok" or not row.get("prefill_tok_s"):
                continue
            engine, prompt = str(row.get("engine")), int(row.get("prompt") or 0)
            if engine == "hf_hybrid":
                hybrid[prompt] = row
            elif engine in ("accelerate", "cpu"):
                others.setdefault(engine, []).append((prompt, float(row["prefill_tok_s"])))
    if len(hybrid) < 2:
        return False
    prompts = sorted(hybrid)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    ax.plot(
        prompts,
        [hybrid[n]["prefill_tok_s"] for n in prompts],
        "o-",
        color=ENGINE_COLORS["hf_hybrid"],
        label="hf_hybrid (measured)",
    )
    for key, style, label in (
        ("prefill_bound_tok_s", "--", "bound: PCIe only"),
        ("prefill_cpu_pcie_bound_tok_s", ":", "bound: CPU + PCIe"),
    ):
        points = [(n, hybrid[n].get(key)) for n in prompts if hybrid[n].get(key)]
        if points:
            ax.plot(*zip(*points), style, color="#333", label=label)
    for engine, points in sorted(others.items()):
        points = sorted(set(points))
        ax.plot(
            *zip(*points), "s", color=ENGINE_COLORS[engine], label=ENGINE_LABELS[engine].replace("\n", " ")
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens (longer than the plan's prefill chunk: one forward per chunk)", fontsize=9)
    ax.set_ylabel("prefill tokens/s", fontsize=9)
    header = records[-1][1].get("header", {})
    ax.set_title(
        f"{header.get('scenario', '')} prefill vs prompt length -- {header.get('device_name', '')}, GPU budget "
        f"{header.get('gpu_memory', '?')}, {str(header.get('date', ''))[:10]}",
        fontsize=9.5,
    )
    ax.legend(fontsize=8)
    _plain_axes(ax)
    _save_figure(plt, fig, path, 130)
    return True


TRACE_COLORS = {"host": "#c8c8c8", "CPU lane": "#55a868", "PCIe copy": "#dd8452", "GPU": "#4c72b0"}


def timeline_figure(plt, trace_path: Path, path: Path) -> bool:
    """Draw a ``model.trace()`` file (Chrome trace JSON) as one row per lane."""
    try:
        events = json.loads(trace_path.read_text())["traceEvents"]
    except (OSError, ValueError, KeyError):
        return False
    names = {
        e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    spans = [e for e in events if e.get("ph") == "X"]
    if not spans:
        return False
    rows = [tid for tid in sorted(names) if any(e["tid"] == tid for e in spans)]
    fig, ax = plt.subplots(figsize=(12, 0.6 + 0.55 * len(rows)))
    for row, tid in enumerate(rows):
        lane = names[tid]
        bars = [(e["ts"] / 1e3, max(e["dur"] / 1e3, 0.01)) for e in spans if e["tid"] == tid]
        color = TRACE_COLORS.get(lane, "#999")
        if lane == "host":
            # the host row holds whole forwards: draw them as outlines behind the lane work
            ax.broken_barh(bars, (row - 0.35, 0.7), facecolors="none", edgecolors="#777", linewidth=0.6)
        else:
            ax.broken_barh(bars, (row - 0.35, 0.7), facecolors=color, edgecolors="none")
    ax.set_yticks(range(len(rows)), [names[t] for t in rows], fontsize=8)
    ax.set_xlabel("milliseconds", fontsize=9)
    ax.invert_yaxis()
    ax.set_title(f"timeline: {trace_path.name}", fontsize=10)
    _plain_axes(ax)
    _save_figure(plt, fig, path, 120)
    return True


def budget_figure(plt, stem: str, record: dict, path: Path) -> bool:
    """Throughput vs GPU budget from a record of a budget sweep (``hf-hybrid bench --budgets ...``)."""
    points = []
    for row in record.get("rows", []):
        if (
            row.get("status") == "ok"
            and str(row.get("engine", "")).startswith("hf_hybrid")
            and row.get("gpu_memory")
        ):
            if "[" in row["engine"]:
                continue  # token-assignment variants share the main row's budget
            budget = row.get("plan", {}).get("budget", {}).get("total")
            if budget:
                points.append((budget / 1024**3, row))
    if len({b for b, _ in points}) < 2:
        return False
    points.sort(key=lambda p: p[0])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in (
        (axes[0], "prefill_tok_s", "prefill tok/s"),
        (axes[1], "decode_tok_s", "decode tok/s"),
    ):
        xs = [b for b, _ in points]
        measured = [row.get(key) or float("nan") for _, row in points]
        predicted = [(row.get("predicted") or {}).get(key) or float("nan") for _, row in points]
        ax.plot(xs, measured, "o-", color=ENGINE_COLORS["hf_hybrid"], label="measured")
        ax.plot(xs, predicted, "s--", color="#999", label="plan's prediction")
        ax.set_xlabel("GPU budget (GiB)", fontsize=9)
        ax.set_title(title, fontsize=10)
        _plain_axes(ax)
        ax.legend(fontsize=8, frameon=False)
    header = record.get("header", {})
    fig.suptitle(
        f"{header.get('scenario', stem)}: throughput vs GPU budget ({header.get('device_name', '')})",
        fontsize=10,
    )
    _save_figure(plt, fig, path, 120)
    return True


def main(argv: list[str] | None = None) -> int:
    """Write the figures; returns 0 (also when matplotlib is missing)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "docs" / "data", help="bench JSON directory")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="output directory")
    parser.add_argument(
        "--prefill-vs-prompt",
        type=Path,
        action="append",
        default=[],
        help="a directory of bench records of one scenario at several prompt lengths (one machine): writes "
        "<parent>-<directory>-<scenario>.png (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figures made (pip install matplotlib)")
        return 0
    plt.rcParams["svg.hashsalt"] = "hf_hybrid"
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    lanes = args.out / "lanes.png"
    lanes_figure(plt, lanes)
    written.append(lanes)
    for scenario, records in sorted(load_records(args.data).items()):
        target = args.out / f"{scenario.lower()}.png"
        if scenario_figure(plt, scenario, records, target):
            written.append(target)
    for path in sorted(args.data.glob("*.json")):
        if path.name.endswith(".trace.json"):
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        target = args.out / f"{path.stem}-budget.png"
        if isinstance(record, dict) and budget_figure(plt, path.stem, record, target):
            written.append(target)
    for trace in sorted(args.data.glob("*.trace.json")):
        target = args.out / (trace.name[: -len(".trace.json")] + "-timeline.png")
        if timeline_figure(plt, trace, target):
            written.append(target)
    for directory in args.prefill_vs_prompt:
        for scenario, records in sorted(load_records(directory).items()):
            target = args.out / f"{directory.parent.name}-{directory.name}-{scenario.lower()}.png"
            if prefill_length_figure(plt, records, target):
                written.append(target)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
