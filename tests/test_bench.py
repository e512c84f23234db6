"""Tests of ``hf_hybrid.bench`` on tiny scenarios (CPU only, a few seconds)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import hf_hybrid.bench.checkpoint as checkpoint_mod
import hf_hybrid.bench.engines as engines_mod
from hf_hybrid.bench import (
    SCENARIOS,
    add_cli,
    build_checkpoint,
    build_parser,
    get_scenario,
    parse_skew,
    run_bench,
    run_from_args,
)
from hf_hybrid.bench.bounds import compute_bounds
from hf_hybrid.bench.checkpoint import CheckpointBuildError, checkpoint_key, read_meta
from hf_hybrid.bench.output import TABLE_COLUMNS, write_result
from hf_hybrid.profile import default_profile
from hf_hybrid.units import parse_bytes


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a busy 2-core box OpenMP barriers make tiny ops slow and timings erratic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache directory for the module, so each tiny checkpoint is built once."""
    return tmp_path_factory.mktemp("bench-cache")


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()


# ------------------------------------------------------------------------------------------- scenarios


def test_scenarios_have_real_shapes():
    s1 = get_scenario("s1")
    assert s1.config["hidden_size"] == 4096 and s1.config["num_hidden_layers"] == 8
    assert s1.gpu_memory == "6GiB" and (s1.batch, s1.prompt, s1.new_tokens) == (1, 512, 128)
    assert (
        get_scenario("S3").config["num_experts"] == 128 and get_scenario("S3").config["vocab_size"] == 151936
    )
    assert not get_scenario("S2").is_moe and get_scenario("S4").family == "phimoe"
    assert {"tiny-moe", "tiny-dense"} <= set(SCENARIOS)
    with pytest.raises(ValueError, match="unknown scenario"):
        get_scenario("S9")


def test_parse_skew():
    assert parse_skew(None) is None and parse_skew("none") is None
    assert parse_skew("zipf") == ("zipf", 1.0)
    assert parse_skew("zipf:1.5") == ("zipf", 1.5)
    with pytest.raises(ValueError):
        parse_skew("pareto")
    assert checkpoint_key("tiny-moe", "zipf:1.5", 3) == "tiny-moe-zipf1.5-seed3"


def test_full_size_byte_counts_from_meta_model():
    """S1 is the 22.1 GiB headline checkpoint (checked on the meta device: no memory used)."""
    config = checkpoint_mod.make_config("S1")
    info = checkpoint_mod.byte_breakdown(checkpoint_mod._meta_model(config), config)
    assert abs(info["total"] / 1024**3 - 22.1) < 0.05
    layer = info["layers"][0]
    assert layer["num_experts"] == 8 and layer["top_k"] == 2
    assert layer["expert_bytes"] == 3 * 4096 * 14336 * 2


# ------------------------------------------------------------------------------------------- building


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
def test_build_tiny_checkpoint(cache, name):
    path = build_checkpoint(name, cache_dir=cache, progress=False)
    assert path == cache / f"{name}-uniform-seed0"
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    meta = read_meta(path)
    assert meta["scenario"] == name and meta["bytes"]["total"] > 0
    assert not list(cache.glob(f".{name}*.tmp-*")), "temp dir left behind"
    model = _load(path)
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == meta["bytes"]["total"]
    with torch.no_grad():
        logits = model(torch.randint(0, model.config.vocab_size, (1, 8))).logits
    assert torch.isfinite(logits.float()).all()
    if name == "tiny-moe":
        assert meta["routing"]["top_k"] == 2 and len(meta["routing"]["expert_probs"]) == 2
    else:
        assert meta["routing"] == {}


def test_cache_is_reused(cache, monkeypatch):
    path = build_checkpoint("tiny-moe", cache_dir=cache, progress=False)
    stamp = (path / checkpoint_mod.META_NAME).stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a complete checkpoint was rebuilt")

    monkeypatch.setattr(checkpoint_mod, "_instantiate", no_rebuild)
    assert build_checkpoint("tiny-moe", cache_dir=cache, progress=False) == path
    assert (path / checkpoint_mod.META_NAME).stat().st_mtime_ns == stamp


def test_killed_build_leaves_nothing_reusable(tmp_path, monkeypatch):
    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt  # as if the build were killed while writing shards

    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        build_checkpoint("tiny-dense", cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # a dead build's temp dir (its process is gone) is cleaned up by the next build
    stale = tmp_path / ".tiny-dense-uniform-seed0.tmp-999999999-deadbeef"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    path = build_checkpoint("tiny-dense", cache_dir=tmp_path, progress=False)
    assert not stale.exists() and checkpoint_mod.is_complete(path)


def test_disk_check_raises_clear_error(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint_mod.shutil, "disk_usage", lambda p: usage(10**12, 10**12, 1024))
    with pytest.raises(CheckpointBuildError, match="not enough free disk"):
        build_checkpoint("tiny-moe", cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob("tiny-moe*"))


def test_dense_scenario_refuses_skew(tmp_path):
    with pytest.raises(ValueError, match="dense"):
        build_checkpoint("tiny-dense", cache_dir=tmp_path, skew="zipf")


def _router_shares(model, tokens: int = 512, seed: int = 7) -> list[float]:
    """Run the model on random token ids; per layer, the top expert's share of all router selections."""
    top_k = model.config.num_experts_per_tok
    shares: list[float] = []

    def hook(module, args, output):
        logits = output[0] if isinstance(output, tuple) else output
        picks = logits.float().topk(top_k, dim=-1).indices.flatten()
        counts = torch.bincount(picks, minlength=logits.shape[-1]).float()
        shares.append(float(counts.max() / counts.sum()))

    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (4, tokens // 4), generator=gen)
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return shares


def test_zipf_skew_skews_routing(cache):
    uniform = _load(build_checkpoint("tiny-moe", cache_dir=cache, progress=False))
    skewed_path = build_checkpoint("tiny-moe", cache_dir=cache, skew="zipf", progress=False)
    skewed = _load(skewed_path)
    experts = skewed.config.num_local_experts
    uniform_shares = _router_shares(uniform)
    skewed_shares = _router_shares(skewed)
    # Zipf s=1 over 8 experts, top-2: the hottest expert gets ~37% of selections (uniform: 12.5%)
    for share, base in zip(skewed_shares, uniform_shares):
        assert share > 2.2 / experts, skewed_shares
        assert share > base + 0.08, (skewed_shares, uniform_shares)
    meta = read_meta(skewed_path)
    assert meta["skew"] == {"kind": "zipf", "exponent": 1.0}
    assert meta["routing"]["top_share_mean"] > 2.2 / experts
    # the skew does not break the model: outputs stay finite
    with torch.no_grad():
        assert torch.isfinite(skewed(torch.randint(0, 256, (1, 16))).logits.float()).all()


def test_zipf_targets_sum_to_top_k():
    target = checkpoint_mod._zipf_targets(128, 8, 1.0)
    assert abs(float(target.sum()) - 8) < 1e-3 and float(target.max()) <= 1.0
    assert (target[:-1] >= target[1:]).all()


# ------------------------------------------------------------------------------------------- the bench


def _check_record(record: dict, json_path: Path, engines: list[str]) -> None:
    on_disk = json.loads(json_path.read_text())
    assert on_disk["rows"] == record["rows"]
    assert [r["engine"] for r in record["rows"]] == engines
    for key in ("scenario", "device", "device_name", "date", "gpu_memory", "command"):
        assert key in record["header"]
    for key in ("torch", "transformers", "cpu_model", "torch_threads", "python"):
        assert key in record["machine"]
    table = record["table"]
    assert "| " + " | ".join(TABLE_COLUMNS) + " |" in table
    assert table.count("\n| ") == 1 + len(engines)  # header row + one row per engine
    assert record["header"]["scenario"] in table.splitlines()[0]


def test_run_bench_cpu_engine(cache, tmp_path, capsys):
    json_path = tmp_path / "out" / "bench.json"
    record = run_bench(
        "tiny-moe", engines="cpu", cache_dir=cache, json_path=json_path, device="cpu", progress=False
    )
    _check_record(record, json_path, ["cpu"])
    row = record["rows"][0]
    assert row["status"] == "ok", row
    assert (row["prompt"], row["new_tokens"], row["batch"]) == (32, 8, 1)
    assert row["generated_tokens"] == 8
    assert row["prefill_tok_s"] > 0 and row["e2e_s"] > 0 and row["prefill_s"] <= row["e2e_s"] + 0.05
    assert "decode_tok_s" in row and "speedup_vs_accelerate" in row
    assert row["speedup_vs_accelerate"] is None  # no accelerate row on a CPU-only run
    printed = capsys.readouterr().out
    assert "| cpu | 32 | 8 |" in printed and str(json_path) in printed


def test_hf_hybrid_engine(cache, tmp_path):
    try:
        from hf_hybrid import HybridModelForCausalLM  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"hf_hybrid.HybridModelForCausalLM not importable yet: {exc}")
    json_path = tmp_path / "hybrid.json"
    record = run_bench(
        "tiny-moe",
        skew="zipf",
        engines="hf_hybrid,cpu",
        cache_dir=cache,
        json_path=json_path,
        device="cpu",
        progress=False,
        print_table=False,
        baseline_new_tokens=4,
    )
    _check_record(record, json_path, ["hf_hybrid", "cpu"])
    hybrid, cpu = record["rows"]
    assert hybrid["status"] == "ok", hybrid.get("traceback") or hybrid
    assert hybrid["generated_tokens"] == 8
    assert hybrid["decode_tok_s"] > 0 and hybrid["decode_tok_s_by_difference"] is not None
    # decode timed inside the full call: its 7 steps, never longer than the call without its prefill
    assert hybrid["decode_step_s"] * 7 <= hybrid["full_s"]
    plan = hybrid.get("plan") or {}
    homes = {u.get("home") for u in plan.get("units", [])}
    assert homes - {"gpu"}, "the tiny budget must force offload"
    assert hybrid["prefill_bound_tok_s"] and hybrid["prefill_pct_of_bound"] is not None
    assert (cpu["prompt"], cpu["new_tokens"]) == (32, 4)
    assert "projected" in cpu["note"]


def test_failing_engine_becomes_error_row(cache, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom: simulated out of memory")

    monkeypatch.setitem(engines_mod.LOADERS, "cpu", broken)
    json_path = tmp_path / "err.json"
    record = run_bench(
        "tiny-dense",
        engines="cpu,gpu,accelerate",
        cache_dir=cache,
        json_path=json_path,
        device="cpu",
        progress=False,
        print_table=False,
    )
    _check_record(record, json_path, ["cpu", "gpu", "accelerate"])
    cpu, gpu, acc = record["rows"]
    assert cpu["status"] == "error" and "boom" in cpu["error"] and "RuntimeError" in cpu["traceback"]
    assert gpu["status"] == "skipped" and "CUDA" in gpu["reason"]
    assert acc["status"] == "skipped" and "CUDA" in acc["reason"]
    assert "error: RuntimeError: boom" in record["table"]


def test_bounds_from_plan_units_and_estimate():
    meta = {
        "bytes": {
            "total": 1000,
            "embed": 0,
            "lm_head": 0,
            "final_norm": 0,
            "layers": [
                {"layer": 0, "attention": 100, "router": 0, "norms": 0, "mlp": 0, "experts": 800}
                | {"num_experts": 8, "top_k": 2, "expert_bytes": 100}
            ],
        },
        "routing": {},
    }
    profile = default_profile("cpu")
    plan = {
        "units": [
            {"name": "layers.0.attention", "kind": "attention", "layer": 0, "home": "gpu", "bytes": 100}
        ]
        + [
            {"name": f"layers.0.experts.{e}", "kind": "expert", "layer": 0, "home": home, "bytes": 100}
            for e, home in enumerate(["gpu"] * 4 + ["cpu"] * 2 + ["stream"] * 2)
        ]
    }
    bounds = compute_bounds(meta, profile, 600, prompt=100, batch=1, plan=plan)
    assert bounds["source"] == "plan.units" and bounds["host_bytes"] == 400
    assert bounds["prefill_bound_tok_s"] == pytest.approx(100 / (400 / profile.h2d_bw))
    # each of the 4 host experts is read with probability top_k / num_experts = 1/4 per token
    assert bounds["decode_host_bytes_per_step"] == pytest.approx(100)
    decode_bw = profile.cpu_gemv_bw_during_copy + profile.h2d_bw_during_cpu
    assert bounds["decode_bound_tok_s"] == pytest.approx(decode_bw / 100)
    # batch 4: P(at least one token needs an expert) = 1 - (3/4)^4
    batch4 = compute_bounds(meta, profile, 600, prompt=100, batch=4, plan=plan)
    assert batch4["decode_host_bytes_per_step"] == pytest.approx(400 * (1 - 0.75**4))
    # no plan: the ideal placement under the budget -- attention, then 5 experts fit in 600 bytes
    estimate = compute_bounds(meta, profile, 600, prompt=100, batch=1)
    assert estimate["source"] == "estimate" and estimate["host_bytes"] == 300
    # everything fits: nothing bounds the rates
    assert compute_bounds(meta, profile, 10**6, prompt=100, batch=1)["prefill_bound_tok_s"] is None
    # a plan whose workspace holds 32 tokens prefills 100 in 4 forwards: the host bytes cross 4 times
    chunked = compute_bounds(meta, profile, 600, prompt=100, batch=1, plan={**plan, "prefill_chunk": 32})
    assert chunked["prefill_passes"] == 4
    assert chunked["prefill_bound_tok_s"] == pytest.approx(bounds["prefill_bound_tok_s"] / 4)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_options_have_help_and_run(cache, tmp_path, capsys):
    top = argparse.ArgumentParser(prog="hf-hybrid")
    add_cli(top.add_subparsers(dest="command"))
    json_path = tmp_path / "cli.json"
    args = top.parse_args(
        [
            "bench",
            "--scenario",
            "tiny-dense",
            "--engines",
            "cpu",
            "--device",
            "cpu",
            "--cache-dir",
            str(cache),
            "--json",
            str(json_path),
            "--new-tokens",
            "4",
        ]
    )
    assert args.func is run_from_args
    assert args.func(args) == 0
    record = json.loads(json_path.read_text())
    assert record["rows"][0]["new_tokens"] == 4 and record["header"]["command"].startswith("hf-hybrid bench")
    for action in build_parser()._actions:
        assert action.help, f"option {action.option_strings} has no help"
    # bad options give exit code 2 and a message, not a traceback
    bad = top.parse_args(["bench", "--scenario", "tiny-dense", "--skew", "zipf", "--cache-dir", str(cache)])
    assert run_from_args(bad) == 2
    assert "dense" in capsys.readouterr().err


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    from hf_hybrid.bench import default_cache_dir

    monkeypatch.setenv("HF_HYBRID_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "bench"
    monkeypatch.delenv("HF_HYBRID_CACHE")
    assert default_cache_dir() == Path(os.path.expanduser("~/.cache/hf_hybrid/bench"))


def test_hf_hybrid_variants_are_measured_on_one_load(cache, tmp_path):
    json_path = tmp_path / "variants.json"
    record = run_bench(
        "tiny-moe",
        skew="zipf",
        engines="hf_hybrid",
        variants="stream,cpu,calibrated",
        cache_dir=cache,
        json_path=json_path,
        device="cpu",
        progress=False,
        print_table=False,
    )
    engines = [row["engine"] for row in record["rows"]]
    assert engines == ["hf_hybrid", "hf_hybrid[stream]", "hf_hybrid[cpu]", "hf_hybrid[calibrated]"]
    base, stream, cpu, calibrated = record["rows"]
    for row in record["rows"]:
        assert row["status"] == "ok", row.get("error")
        assert row["generated_tokens"] == base["new_tokens"]
    assert stream["lanes"]["cpu_units"] == 0 and stream["lanes"]["streamed_units"] > 0
    assert cpu["lanes"]["streamed_units"] == 0 and cpu["lanes"]["cpu_units"] > 0
    assert calibrated["plan"]["predicted"] == calibrated["predicted"]
    assert "hf_hybrid[calibrated]" in record["table"]
    with pytest.raises(ValueError, match="unknown variant"):
        run_bench("tiny-moe", engines="hf_hybrid", variants="warp", cache_dir=cache, device="cpu")


def test_budget_sweep_adds_one_row_per_budget(cache, tmp_path):
    record = run_bench(
        "tiny-moe",
        engines="hf_hybrid",
        budgets="24MiB,64MiB",
        cache_dir=cache,
        json_path=tmp_path / "sweep.json",
        device="cpu",
        progress=False,
        print_table=False,
    )
    rows = {row["engine"]: row for row in record["rows"]}
    assert list(rows) == ["hf_hybrid", "hf_hybrid@24MiB", "hf_hybrid@64MiB"]
    for row in rows.values():
        assert row["status"] == "ok", row.get("error")
        assert row["plan"]["budget"]["total"] == parse_bytes(row["gpu_memory"])
    assert (
        rows["hf_hybrid@64MiB"]["plan"]["budget"]["resident_weights"]
        >= (rows["hf_hybrid@24MiB"]["plan"]["budget"]["resident_weights"])
    )
    with pytest.raises(ValueError, match="budgets"):
        run_bench("tiny-moe", engines="hf_hybrid", budgets="lots", cache_dir=cache, device="cpu")


# ------------------------------------------------------------------------------------------- results file


def test_result_file_refuses_a_symlink_and_is_private(cache, tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text("keep")
    link = tmp_path / "bench.json"
    link.symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        run_bench("tiny-dense", engines="cpu", cache_dir=cache, json_path=link, device="cpu", progress=False)
    with pytest.raises(ValueError, match="symbolic link"):
        write_result(link, "{}")
    assert link.is_symlink() and target.read_text() == "keep"
    fresh = tmp_path / "out" / "fresh.json"
    write_result(fresh, "{}")
    assert fresh.read_text() == "{}" and fresh.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in fresh.parent.iterdir()] == ["fresh.json"], "temp file left behind"


def test_shared_bounds_module_is_pure_python():
    code = (
        "import sys, hf_hybrid.bounds; "
        "sys.exit(sorted(m for m in ('torch', 'transformers') if m in sys.modules) != [])"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent).returncode == 0


def test_transfer_bounds_fall_back_on_missing_rates():
    from types import SimpleNamespace

    from hf_hybrid.bounds import host_read_bytes, transfer_bounds

    # no rates during the other lane: the CPU's solo rate at the batch, and the plain h2d rate
    profile = SimpleNamespace(h2d_bw=10.0, cpu_weight_bw=lambda tokens: 5.0 * tokens)
    step = host_read_bytes([(10, 0.5)], 2)
    assert step == pytest.approx(7.5)
    bounds = transfer_bounds(20, step, profile, prompt=3, batch=2)
    assert bounds["prefill_bound_tok_s"] == pytest.approx(6 / (20 / 10.0))
    assert bounds["decode_bw"] == pytest.approx(20.0)
    assert bounds["decode_bound_tok_s"] == pytest.approx(2 / (7.5 / 20.0))
    nothing = transfer_bounds(0, 0.0, profile, prompt=3, batch=2, unbounded=float("inf"))
    assert nothing["prefill_bound_tok_s"] == nothing["decode_bound_tok_s"] == float("inf")


def test_cpu_pcie_prefill_bound_divides_the_host_work_between_the_lanes():
    from types import SimpleNamespace

    from hf_hybrid.bounds import prefill_flops, transfer_bounds

    # S1 at 512 tokens on the PERF.md machine: 52 host experts of 336 MiB, each read by 1/4 of the tokens;
    # GEMMs at 2.7 TFLOP/s while copies run, 53 GB/s of H2D while the CPU computes (55 alone)
    items = [(336 * 2**20, 0.25)] * 52
    profile = SimpleNamespace(h2d_bw=55e9, h2d_bw_during_cpu=53e9, cpu_lane_gemm_flops_during_copy=2.7e12)
    flops = prefill_flops(items, 512)
    assert flops == pytest.approx(52 * 336 * 2**20 * 0.25 * 512)  # bf16: 2 FLOPs per 2-byte parameter
    bytes_ = sum(n for n, _ in items)
    bounds = transfer_bounds(bytes_, 0.0, profile, prompt=512, batch=1, prefill_flops=flops)
    both = 512 * (2.7e12 / flops + 53e9 / bytes_)
    assert bounds["prefill_cpu_pcie_bound_tok_s"] == pytest.approx(both)
    assert 1.3 < both / bounds["prefill_bound_tok_s"] < 1.4  # ~2,050 against ~1,520 tok/s
    # in chunks of 128 tokens: 4 forwards, each with a quarter of the FLOPs and all of the bytes
    chunked = transfer_bounds(
        bytes_, 0.0, profile, prompt=512, batch=1, prefill_chunk=128, prefill_flops=flops / 4
    )
    assert chunked["prefill_cpu_pcie_bound_tok_s"] == pytest.approx(
        128 * (2.7e12 / (flops / 4) + 53e9 / bytes_)
    )
    # a CPU too slow to help, or no GEMM rate in the profile: PCIe alone bounds it
    slow = SimpleNamespace(h2d_bw=55e9, h2d_bw_during_cpu=20e9, cpu_lane_gemm_flops_during_copy=1e9)
    for other in (slow, SimpleNamespace(h2d_bw=55e9)):
        alone = transfer_bounds(bytes_, 0.0, other, prompt=512, batch=1, prefill_flops=flops)
        assert alone["prefill_cpu_pcie_bound_tok_s"] == pytest.approx(alone["prefill_bound_tok_s"])


def test_switch_variants_change_the_loaded_model_only_inside_their_block(tiny_checkpoints):
    from tiny_models import load_every_lane

    model = load_every_lane(tiny_checkpoints["mixtral"], decode_graphs=True)
    runtime = model.hybrid
    graphs = runtime.decode_graphs
    with engines_mod._switched(model, "eager"):
        assert runtime.decode_graphs is None
    with engines_mod._switched(model, "unfused"):
        assert runtime.decode_graphs is graphs and not graphs.fuse_routers
    with engines_mod._switched(model, "rebuilt_masks"):
        assert not graphs.masks.enabled
    assert graphs.masks.enabled
    with pytest.raises(RuntimeError), engines_mod._switched(model, "predict"):
        assert runtime.executor.predict_next_layer
        raise RuntimeError("a failing variant")
    assert runtime.decode_graphs is graphs and graphs.fuse_routers
    assert not runtime.executor.predict_next_layer
    executor = runtime.executor
    with engines_mod._switched(model, "balanced_splits"):
        assert executor.balance_splits
    with engines_mod._switched(model, "lane_thread"):
        assert not executor.direct_native_start
    with engines_mod._switched(model, "eager_experts"):
        assert not executor.graph_experts
    assert executor.graph_experts
    with engines_mod._switched(model, "prefill_splits"):
        assert executor.prefill_splits
    assert not executor.prefill_splits
    with engines_mod._switched(model, "separate_parts"):
        assert not executor.combine_divided
    assert executor.combine_divided
    for spinning in ("spin", "wait_spin"):  # the pool's spin settings are write-only: the model stays usable
        with engines_mod._switched(model, spinning):
            assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False).shape == (
                1,
                5,
            )
    assert not executor.balance_splits and executor.direct_native_start
    runtime.close()


def test_native_lane_decode_bound_prices_the_lane_that_runs():
    """The second decode bound reads the host bytes at the native lane's rate during copies plus the copies'
    rate during it (never below the first bound, which keeps torch's GEMV rate), and equals the first where
    the native lane was not measured."""
    from types import SimpleNamespace

    from hf_hybrid.bounds import transfer_bounds

    # S1 on the H200 machine of 2026-12-04 (call 11): torch's GEMV 68 GB/s, the native lane 106 GB/s during
    # copies, copies 47 GB/s during either; ~4.6 GB of host expert bytes per decode step
    torch_only = SimpleNamespace(h2d_bw=55e9, cpu_gemv_bw_during_copy=68e9, h2d_bw_during_cpu=47e9)
    native = SimpleNamespace(**vars(torch_only), cpu_native_bw_during_copy=106e9, h2d_bw_during_native=47e9)
    step = 4.6e9
    first = transfer_bounds(1e9, step, torch_only, prompt=512, batch=1)
    assert first["decode_native_bound_tok_s"] == first["decode_bound_tok_s"] == pytest.approx(115e9 / step)
    second = transfer_bounds(1e9, step, native, prompt=512, batch=1)
    assert second["decode_bound_tok_s"] == pytest.approx(115e9 / step)  # the first bound keeps its rates
    assert second["decode_native_bound_tok_s"] == pytest.approx(153e9 / step)  # ~33 tok/s
    slow_native = SimpleNamespace(
        **vars(torch_only), cpu_native_bw_during_copy=20e9, h2d_bw_during_native=40e9
    )
    assert transfer_bounds(1e9, step, slow_native, prompt=512, batch=1)["decode_native_bound_tok_s"] == (
        pytest.approx(115e9 / step)
    )


def test_decode_clock_times_the_last_steps_of_a_call():
    """The streamer the bench times decode with: the last ``new_tokens`` tokens handed over bound the decode
    steps, whatever came before them (a prompt put by some transformers versions); too few: no figure."""
    from hf_hybrid.bench.timing import DecodeClock

    clock = DecodeClock()
    clock.stamps = [0.0, 1.0, 1.5, 2.5, 4.0]  # prompt, then four new tokens
    assert clock.decode_s(4) == 3.0
    assert clock.decode_s(6) is None and clock.decode_s(1) is None
    clock = DecodeClock()
    clock.put(torch.tensor([1]))
    clock.put(torch.tensor([2]))
    clock.end()
    assert len(clock.stamps) == 2 and clock.decode_s(2) >= 0


def test_lane_stats_give_the_issue_of_one_streamed_expert():
    from types import SimpleNamespace

    from hf_hybrid.bench.output import _row_note
    from hf_hybrid.bench.timing import lane_stats
    from hf_hybrid.executor import StepStats

    stats = StepStats(host_gap_s=0.002, host_gaps=4, issue_s=0.004, groups=4)
    stats.stream_issue_s, stats.stream_fetch_s, stats.stream_issues = 0.0006, 0.0002, 5
    model = SimpleNamespace(hybrid=SimpleNamespace(executor=SimpleNamespace(stats=stats), decode_graphs=None))
    lanes = lane_stats(model)
    assert lanes["stream_issue_us"] == pytest.approx(120.0)
    assert lanes["stream_fetch_us"] == pytest.approx(40.0)
    settings = SimpleNamespace(prompt=8, new_tokens=4)
    row = {"status": "ok", "prompt": 8, "new_tokens": 4, "lanes": lanes}
    assert "a streamed expert 120 us to issue (40 us its copy)" in _row_note(row, settings)
    stats.stream_issues = 0  # no streamed expert in a decode step: no figure, no note
    lanes = lane_stats(model)
    assert lanes["stream_issue_us"] is None
    assert "streamed expert" not in _row_note({**row, "lanes": lanes}, settings)
