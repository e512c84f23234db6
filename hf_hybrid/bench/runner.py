"""Measure hf_hybrid and the baselines on a scenario's checkpoint, in one process.

Each engine (see :mod:`hf_hybrid.bench.engines`) is loaded, measured and freed before the next.

Per engine: one short warm-up ``generate``; prefill = ``generate(max_new_tokens=1)``; full = ``generate``
of N new tokens (``min_new_tokens=N`` so a random model's EOS cannot stop it early). prefill tok/s =
prompt*batch / t_prefill; decode tok/s = batch*(N-1) / the full call's time from its first new token to
its last (a streamer timestamps them; before 2026-12-04 19:30 UTC: t_full - t_prefill, still in the JSON as
``decode_tok_s_by_difference``); end-to-end = t_full.
The slow baselines (accelerate, cpu) run a shorter workload by default; for the speedup column their
end-to-end time is projected to the headline workload as t_prefill (not scaled with the prompt: offload
prefill is bound by moving the weights once, so this favours the baseline) + (N-1) * t_decode_step.

Bounds (the best any engine could do with this GPU budget on this machine) are the transfer bounds of
:mod:`hf_hybrid.bounds`, from the host-side units of hf_hybrid's plan (else an ideal placement; see
:mod:`hf_hybrid.bench.bounds`). The plan's own ``predicted`` bounds are used when it has them. An engine
that computes some host-side units on the CPU during prefill instead of copying them can come out
slightly above 100 % of the prefill bound.

Module layout: :mod:`~hf_hybrid.bench.settings` (options), :mod:`~hf_hybrid.bench.engines` (loading and
freeing each engine), :mod:`~hf_hybrid.bench.timing` (timing ``generate``), :mod:`~hf_hybrid.bench.bounds`,
:mod:`~hf_hybrid.bench.output` (derived columns, table, JSON file) and :mod:`~hf_hybrid.bench.machine`
(versions, hardware profile).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..units import parse_bytes
from .checkpoint import build_checkpoint, checkpoint_key, read_meta
from .engines import run_engine
from .machine import device_name, load_profile, machine_info
from .output import TABLE_COLUMNS, check_destination, finish_rows, jsonable, render_table, write_result
from .scenarios import skew_label
from .settings import BenchSettings, options_skew_text, resolve_settings
from .timing import random_prompt


def _measure_all(path: Path, settings: BenchSettings, ids: Any) -> list[dict]:
    """One row per engine (hf_hybrid followed by its variants), then one per swept budget."""
    rows = []
    for engine in settings.engines:
        row = run_engine(engine, path, settings, ids)
        rows.append(row)
        if engine == "hf_hybrid":
            row["gpu_memory"] = settings.gpu_memory
            rows.extend(row.pop("variant_rows", None) or [])
    # the budget sweep: hf_hybrid again under each extra budget (a reload each), for throughput vs budget
    for budget in settings.extra.get("budgets") or ():
        swept = dataclasses.replace(
            settings,
            gpu_memory=budget,
            budget_bytes=parse_bytes(budget, "budgets"),
            extra={**settings.extra, "variants": []},
        )
        row = run_engine("hf_hybrid", path, swept, ids)
        row.update(engine=f"hf_hybrid@{budget}", gpu_memory=budget)
        rows.append(row)
    return rows


def _header(settings: BenchSettings, started: str, dev_name: str) -> dict:
    sc = settings.scenario
    text = (
        f"**hf-hybrid bench** scenario {sc.name} ({sc.description}, skew {skew_label(settings.skew)}, seed "
        f"{settings.seed}) | device {settings.device}: {dev_name} | {started} | GPU budget {settings.gpu_memory} | "
        f"batch {settings.batch}, prompt {settings.prompt}, {settings.new_tokens} new | command: `{settings.command}`"
    )
    return {
        "scenario": sc.name,
        "description": sc.description,
        "skew": options_skew_text(settings.skew),
        "device": settings.device,
        "device_name": dev_name,
        "date": started,
        "gpu_memory": settings.gpu_memory,
        "gpu_budget_bytes": settings.budget_bytes,
        "batch": settings.batch,
        "prompt": settings.prompt,
        "new_tokens": settings.new_tokens,
        "baseline_prompt": settings.baseline_prompt,
        "baseline_new_tokens": settings.baseline_new_tokens,
        "command": settings.command,
        "text": text,
    }


def run_bench(scenario: str, **options: Any) -> dict:
    """Build (or reuse) ``scenario``'s checkpoint, measure every engine, print the table, write JSON.

    Options (all optional; defaults come from the scenario): ``skew`` (None/"zipf"/"zipf:S"), ``batch``,
    ``prompt``, ``new_tokens``, ``baseline_prompt`` and ``baseline_new_tokens`` (workload of the slow
    baselines accelerate and cpu), ``gpu_memory`` (budget, e.g. "6GiB"), ``device`` (default cuda if
    available else cpu), ``engines`` ("hf_hybrid,gpu,accelerate,cpu" or a list; default all that apply),
    ``cache_dir``, ``json_path`` (default ``<cache_dir>/results/<key>-<time>.json``; written atomically,
    a symlink there is refused), ``seed``, ``cleanup`` (delete the checkpoint afterwards), ``profile``
    (hardware profile of the bounds: "auto" = the one hf_hybrid's plan used, "quick"/"full" =
    ``load_or_measure``, "default" = ``default_profile``), ``repeats`` (time each call this many times,
    keep the fastest; default 1), ``command`` (shown in the header), ``routing_stats`` (bool: hand
    hf_hybrid the checkpoint's measured routing as ``routing_stats``, as a deployment that profiled its
    traffic would), ``budgets`` (extra GPU budgets, a row each), ``variants`` (extra hf_hybrid rows, see
    :func:`hf_hybrid.bench.engines.measure_variants`), ``prefill_chunk`` (hf_hybrid's option: tokens per
    prefill forward, for prompts longer than its workspace should hold), ``progress`` and ``print_table``
    (bool).

    Returns the record that is written as JSON: ``header``, ``rows`` (one per engine), ``table`` (markdown),
    ``machine``, ``scenario``, ``settings``, ``checkpoint``, ``profile``, ``json_path``.
    """
    settings = resolve_settings(scenario, **options)
    sc = settings.scenario
    if settings.json_path is not None:
        check_destination(settings.json_path)  # before the long part, not after it
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    build_start = time.perf_counter()
    path = build_checkpoint(sc, settings.cache_dir, options_skew_text(settings.skew), settings.seed,
                            progress=settings.extra["progress"])  # fmt: skip
    build_s = time.perf_counter() - build_start
    meta = read_meta(path)
    vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])
    longest = max(settings.prompt, settings.baseline_prompt)
    ids = random_prompt(vocab, settings.batch, longest, settings.seed)

    rows = _measure_all(path, settings, ids)
    hybrid = next((r for r in rows if r["engine"] == "hf_hybrid" and r["status"] == "ok"), None)
    profile, profile_source = load_profile(settings.device, settings.profile, (hybrid or {}).get("plan"))
    finish_rows(rows, meta, profile, settings)

    header = _header(settings, started, device_name(settings.device))
    table = render_table(rows, settings, header["text"])
    json_path = settings.json_path or (
        settings.cache_dir
        / "results"
        / f"{checkpoint_key(sc, settings.skew, settings.seed)}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    record = {
        "header": header,
        "columns": list(TABLE_COLUMNS),
        "rows": rows,
        "table": table,
        "machine": machine_info(settings.device),
        "scenario": {**asdict(sc), "is_moe": sc.is_moe},
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("scenario", "extra")},
        "checkpoint": {
            "path": str(path),
            "bytes": meta["bytes"]["total"],
            "build_or_reuse_s": build_s,
            "build": {
                k: meta.get(k) for k in ("key", "build_device", "build_s", "timings", "created", "skew")
            },
            "routing": {k: v for k, v in (meta.get("routing") or {}).items() if k != "expert_probs"},
            "cleaned_up": False,
        },
        "profile": profile.to_dict() if hasattr(profile, "to_dict") else jsonable(profile),
        "profile_source": profile_source,
        "json_path": str(json_path),
    }
    if settings.cleanup:
        shutil.rmtree(path, ignore_errors=True)
        record["checkpoint"]["cleaned_up"] = True
    record = jsonable(record)
    write_result(json_path, json.dumps(record, indent=1))
    if settings.extra["print_table"]:
        print(table, flush=True)
        print(f"\nJSON: {json_path}", flush=True)
    return record
