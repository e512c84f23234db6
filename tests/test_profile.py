"""Measuring the machine, caching the profile, and showing it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import stat

import pytest
import torch

import hf_hybrid.measure as profile_mod
from hf_hybrid.kernels import METHODS
from hf_hybrid.measure import add_cli, load_or_measure, measure
from hf_hybrid.profile import TOKEN_COUNTS, HardwareProfile, default_profile, format_profile


@pytest.fixture(scope="module")
def quick_profile() -> HardwareProfile:
    return measure("cpu", torch.bfloat16, quick=True, progress=False)


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_measure_quick_fills_every_field(quick_profile):
    p = quick_profile
    assert p.measured and p.device == "cpu" and p.dtype == "bfloat16"
    assert p.cpu_threads == torch.get_num_threads()
    from hf_hybrid.kernels import native

    amx = native.available() and native.load().amx  # the native lane's prefill rates exist only with AMX
    for f in dataclasses.fields(HardwareProfile):
        value = getattr(p, f.name)
        if f.name in ("device", "dtype", "measured", "cpu_kernel"):
            continue
        if f.name.startswith("cpu_native_gemm_flops") and not amx:
            assert value is None, f.name
            continue
        if f.name.endswith("_issue_s"):  # launch overhead: measured on CUDA only
            assert value is None, f.name
            continue
        numbers = list(_numbers(value))
        assert numbers, f.name
        assert all(math.isfinite(v) and v > 0 for v in numbers), (f.name, value)
    for key in ("cpu_gemv_bw", "cpu_gemm_flops", "cpu_kernel", "cpu_method_bw"):
        assert set(getattr(p, key)) == set(TOKEN_COUNTS), key
    for m in TOKEN_COUNTS:
        assert p.cpu_kernel[m] in METHODS
        assert p.cpu_gemv_bw[m] == max(p.cpu_method_bw[m].values())
    # more tokens per weight byte: the FLOP rate grows from 1 to 64 tokens
    assert p.cpu_gemm_flops[64] > p.cpu_gemm_flops[1]


def test_dict_round_trip_through_json(quick_profile):
    for p in (quick_profile, default_profile("cuda"), HardwareProfile()):
        back = HardwareProfile.from_dict(json.loads(json.dumps(p.to_dict())))
        assert back == p
    assert (
        HardwareProfile.from_dict({**HardwareProfile().to_dict(), "from_the_future": 1}) == HardwareProfile()
    )


@pytest.fixture
def fake_measure(monkeypatch):
    calls = []

    def fake(device="cpu", dtype=torch.bfloat16, *, quick=False, progress=True):
        calls.append((device, dtype, quick))
        return dataclasses.replace(default_profile(device), measured=True, cpu_threads=len(calls))

    monkeypatch.setattr(profile_mod, "measure", fake)
    return calls


def test_load_or_measure_caches(tmp_path, fake_measure):
    first = load_or_measure("cpu", torch.bfloat16, cache_dir=tmp_path)
    second = load_or_measure("cpu", torch.bfloat16, cache_dir=tmp_path)
    assert len(fake_measure) == 1
    assert second == first
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"
    assert all(c.isalnum() or c in "._-" for c in files[0].name)
    assert json.loads(files[0].read_text())["measured"] is True

    refreshed = load_or_measure("cpu", torch.bfloat16, cache_dir=tmp_path, refresh=True)
    assert len(fake_measure) == 2 and refreshed.cpu_threads == 2
    assert load_or_measure("cpu", torch.bfloat16, cache_dir=tmp_path) == refreshed

    # other dtype and quick profiles are separate entries
    load_or_measure("cpu", torch.float32, cache_dir=tmp_path)
    load_or_measure("cpu", torch.bfloat16, cache_dir=tmp_path, quick=True)
    assert len(fake_measure) == 4 and len(list(tmp_path.glob("*.json"))) == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_dir_from_environment(tmp_path, fake_measure, monkeypatch):
    monkeypatch.setenv("HF_HYBRID_CACHE", str(tmp_path / "env"))
    load_or_measure("cpu", torch.bfloat16)
    assert len(list((tmp_path / "env").glob("*.json"))) == 1


@pytest.mark.parametrize(
    "content", ["{not json", "[1, 2]", '{"cpu_gemv_bw": 3}', '{"cpu_kernel": {"1": "linear"}}', ""]
)
def test_corrupt_cache_is_measured_again(tmp_path, fake_measure, content):
    path = profile_mod.profile_cache_path("cpu", torch.bfloat16, cache_dir=tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    p = load_or_measure("cpu", torch.bfloat16, cache_dir=tmp_path)
    assert p.measured and len(fake_measure) == 1
    assert HardwareProfile.from_dict(json.loads(path.read_text())) == p  # repaired on disk


def test_format_profile(quick_profile):
    text = format_profile(quick_profile)
    for m in TOKEN_COUNTS:
        assert any(line.split()[:1] == [str(m)] for line in text.splitlines()), m
    for word in ("GB/s", "TFLOP/s", "DRAM", quick_profile.cpu_kernel[1]):
        assert word in text
    assert "not measured" in format_profile(HardwareProfile())


def test_cli(tmp_path, fake_measure, capsys):
    parser = argparse.ArgumentParser(prog="hf-hybrid")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["profile", "--device", "cpu", "--json", "--cache-dir", str(tmp_path)])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"
    args = parser.parse_args(
        ["profile", "--device", "cpu", "--dtype", "float32", "--cache-dir", str(tmp_path)]
    )
    assert args.func(args) == 0
    assert "TFLOP/s" in capsys.readouterr().out
    if not torch.cuda.is_available():
        args = parser.parse_args(["profile", "--device", "cuda", "--cache-dir", str(tmp_path)])
        assert args.func(args) == 1


def test_plans_are_complete():
    quick, full = profile_mod._make_plan(True), profile_mod._make_plan(False)
    for plan in (quick, full):
        assert all(v > 0 for v in dataclasses.astuple(plan))
    assert quick.rotation_bytes <= full.rotation_bytes and quick.min_time < full.min_time


def test_cache_name_follows_openmp_wait_policy(monkeypatch, tmp_path):
    from hf_hybrid.measure import profile_cache_path

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    passive = profile_cache_path("cpu", cache_dir=tmp_path)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    active = profile_cache_path("cpu", cache_dir=tmp_path)
    assert passive != active and "omp-passive" in passive.name


# ------------------------------------------------------------------------------- cache validation
def _valid_cache() -> dict:
    return {**default_profile("cpu").to_dict(), "measured": True}


def _set(path: tuple, value):
    """A change to a valid cache's JSON: ``value`` at ``path`` (``_MISSING`` deletes the key)."""

    def change(data: dict) -> None:
        *parents, last = path
        for key in parents:
            data = data[key]
        if value is _MISSING:
            del data[last]
        else:
            data[last] = value

    return change


_MISSING = object()
BAD_CACHES = {
    "zero bandwidth": (_set(("h2d_bw",), 0), "h2d_bw"),
    "negative bandwidth": (_set(("dram_read_bw",), -1e9), "dram_read_bw"),
    "infinite bandwidth": (_set(("gpu_mem_bw",), math.inf), "gpu_mem_bw"),
    "nan rate": (_set(("cpu_gemm_flops", "64"), math.nan), "cpu_gemm_flops"),
    "string rate": (_set(("cpu_gemv_bw", "1"), "fast"), "cpu_gemv_bw"),
    "string bandwidth": (_set(("h2d_bw_during_cpu",), "8e9"), "h2d_bw_during_cpu"),
    "bool bandwidth": (_set(("gpu_flops",), True), "gpu_flops"),
    "zero threads": (_set(("cpu_threads",), 0), "cpu_threads"),
    "string threads": (_set(("cpu_threads",), "4"), "cpu_threads"),
    "unknown kernel": (_set(("cpu_kernel", "1"), "fastest"), "cpu_kernel"),
    "unknown method": (_set(("cpu_method_bw",), {"1": {"magic": 1e9}}), "cpu_method_bw"),
    "missing token count": (_set(("cpu_gemm_flops", "512"), _MISSING), "cpu_gemm_flops"),
    "missing kernel token count": (_set(("cpu_kernel", "2"), _MISSING), "cpu_kernel"),
    "token count not a number": (_set(("cpu_gemv_bw", "many"), 1e9), "cpu_gemv_bw"),
    "table not a table": (_set(("cpu_gemv_bw",), 15e9), "cpu_gemv_bw"),
    "missing field": (_set(("h2d_bw",), _MISSING), "h2d_bw"),
    "negative optional rate": (_set(("cpu_lane_gemv_bw",), -5.0), "cpu_lane_gemv_bw"),
    "measured not a bool": (_set(("measured",), "yes"), "measured"),
    "dtype not a string": (_set(("dtype",), 16), "dtype"),
}


@pytest.mark.parametrize("case", list(BAD_CACHES))
def test_bad_cache_values_are_measured_again_with_one_warning(tmp_path, fake_measure, caplog, case):
    change, field_name = BAD_CACHES[case]
    data = _valid_cache()
    change(data)
    path = profile_mod.profile_cache_path("cpu", torch.bfloat16, cache_dir=tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        p = load_or_measure("cpu", torch.bfloat16, cache_dir=tmp_path)
    assert p.measured and len(fake_measure) == 1, "a bad cache was used"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert str(path) in warnings[0].getMessage() and field_name in warnings[0].getMessage()
    assert HardwareProfile.from_dict(json.loads(path.read_text())) == p  # repaired on disk
    if case != "missing field":  # from_dict fills a missing field with its default (older saved plans)
        with pytest.raises(ValueError, match=field_name):
            HardwareProfile.from_dict(data)


def test_valid_caches_load_without_a_warning(tmp_path, fake_measure, caplog, quick_profile):
    for p in (quick_profile, default_profile("cuda"), HardwareProfile()):
        p.validate()
    data = _valid_cache()
    path = profile_mod.profile_cache_path("cpu", torch.bfloat16, cache_dir=tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        p = load_or_measure("cpu", torch.bfloat16, cache_dir=tmp_path)
    assert fake_measure == [] and p == HardwareProfile.from_dict(data)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_validate_names_the_field():
    with pytest.raises(ValueError, match="h2d_bw"):
        dataclasses.replace(HardwareProfile(), h2d_bw=0.0).validate()
    with pytest.raises(ValueError, match="cpu_kernel"):
        dataclasses.replace(HardwareProfile(), cpu_kernel={m: "nope" for m in TOKEN_COUNTS}).validate()


def test_known_kernel_names_match_the_kernels():
    from hf_hybrid.profile import CPU_KERNELS

    assert tuple(CPU_KERNELS) == tuple(METHODS)


# ------------------------------------------------------------------------------------ cache writes
def test_cache_is_written_private_and_atomically(tmp_path, fake_measure):
    load_or_measure("cpu", torch.bfloat16, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    load_or_measure("cpu", torch.bfloat16, cache_dir=tmp_path, refresh=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_cache_is_not_written_through_a_symlink(tmp_path, fake_measure, caplog):
    target = tmp_path / "elsewhere.txt"
    target.write_text("not yours")
    path = profile_mod.profile_cache_path("cpu", torch.bfloat16, cache_dir=tmp_path / "cache")
    path.parent.mkdir(parents=True)
    path.symlink_to(target)
    with caplog.at_level(logging.WARNING):
        p = load_or_measure("cpu", torch.bfloat16, cache_dir=tmp_path / "cache")
    assert p.measured and len(fake_measure) == 1
    assert path.is_symlink() and target.read_text() == "not yours"
    assert any("symbolic link" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert list(path.parent.iterdir()) == [path]


def test_the_native_lane_on_amx_tiles_is_measured_on_prefill_sized_jobs():
    """Where the native lane has AMX tiles (here: the emulated build) the profile measures it on the
    prefill-sized jobs it then takes, alone and while copies run; the cost model prices such jobs with it."""
    import shutil

    from hf_hybrid.costs import cpu_share, cpu_time
    from hf_hybrid.kernels import native
    from hf_hybrid.lanes import CpuLane, DeviceLanes
    from hf_hybrid.measure import _make_experts, _make_plan, _measure_native
    from hf_hybrid.units import CPU, GPU, Unit

    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    plan = _make_plan(True)
    experts = _make_experts(plan, torch.bfloat16)[:2]
    cpu_lane = CpuLane(2)
    try:
        emulated = native.load(("-DHF_AMX_EMULATE",))
        found = _measure_native(
            plan, DeviceLanes(torch.device("cpu")), cpu_lane, experts, torch.bfloat16, emulated
        )
        assert found.bw and found.gemm_flops > 0 and found.gemm_flops_during_copy > 0
        without = native.load(("-mno-avx512f",) if native.cpu_has("avx512f") else None)
        if not without.amx:
            plain = _measure_native(
                plan, DeviceLanes(torch.device("cpu")), cpu_lane, experts, torch.bfloat16, without
            )
            assert plain.bw and plain.gemm_flops is None and plain.gemm_flops_during_copy is None
    finally:
        cpu_lane.close()
    profile = dataclasses.replace(
        default_profile("cuda"), cpu_native_gemm_flops=4e12, cpu_native_gemm_flops_during_copy=3e12
    )
    expert = Unit("layers.0.experts.0", "expert", 0, 336 << 20, 336 << 20, (GPU, CPU))
    assert cpu_time(expert, 128, profile) == pytest.approx(128 * expert.flops_per_token / 4e12)
    assert cpu_share(profile, 128) == pytest.approx(0.75)
    # decode-sized jobs keep their own rates
    assert cpu_time(expert, 1, profile) == cpu_time(expert, 1, default_profile("cuda"))


def test_the_native_lanes_decode_rates_are_measured_on_calls_made_as_decode_steps_make_them():
    """The decode rates come from calls started and waited for from the calling thread, with a pause
    after each (the lane's threads sleep between layer steps): the time counted is the calls' own, not the
    pauses, and the counted calls are those after the warm-up."""
    import shutil
    import time

    from hf_hybrid.kernels import native
    from hf_hybrid.lanes import CpuLane
    from hf_hybrid.measure import DECODE_CALL_GAP_S, _decode_calls, _make_experts, _make_plan

    if shutil.which("gcc") is None or not native.available():
        pytest.skip("the native kernel is not built here")
    plan = _make_plan(True)
    experts = _make_experts(plan, torch.bfloat16)[:4]
    steps = [experts[:2], experts[2:]]
    lane = native.NativeExpertLane(2)
    cpu_lane = CpuLane(2)
    try:
        calls = _decode_calls(plan, lane, steps, 1, torch.bfloat16)
        began = time.perf_counter()
        per_call = calls.seconds_alone(cpu_lane, plan)
        wall = time.perf_counter() - began
        counted = calls.calls
        assert counted >= plan.min_passes * len(steps) and counted % len(steps) == 0
        assert 0 < per_call and per_call * counted >= plan.min_time
        # the wall time holds the warm-up pass and a pause after every call; the calls' own time does not
        assert wall >= (counted + len(steps)) * DECODE_CALL_GAP_S + per_call * counted
    finally:
        cpu_lane.close()
        lane.close()


def test_device_issue_is_timed_kernel_by_kernel_and_on_the_expert_graphs(monkeypatch):
    """The profile's issue times per expert: kernel by kernel (multi-token steps, divided experts' rows) and
    on the path one-token steps take (the expert graphs: a weight copy and a replay, eagerly on the CPU
    standing in), resident and streamed each."""
    from hf_hybrid.expert_graphs import ExpertGraphs
    from hf_hybrid.lanes import DeviceLanes

    used = []
    whole = ExpertGraphs.whole

    def counted(self, *args):
        used.append(args[0].shape)
        return whole(self, *args)

    monkeypatch.setattr(ExpertGraphs, "whole", counted)
    dev = torch.device("cpu")
    times = profile_mod._measure_device_issue(DeviceLanes(dev), dev, torch.bfloat16)
    assert len(times) == 4 and all(t > 0 for t in times)
    reps = 10 + profile_mod._ISSUE_BLOCKS * profile_mod._ISSUE_REPS
    assert len(used) == 2 * reps  # the two graph measurements, nothing else


def test_one_token_steps_are_priced_with_the_graph_issue_times():
    """Steps of one token price a whole GPU-lane expert's issue at the profile's graph figures, other steps
    (and profiles without them) at the kernel-by-kernel ones."""
    from hf_hybrid.costs import issue_times

    p = dataclasses.replace(
        default_profile(),
        device_unit_issue_s=130e-6,
        streamed_unit_issue_s=230e-6,
        graph_unit_issue_s=20e-6,
        graph_streamed_issue_s=110e-6,
    )
    assert issue_times(p, tokens=1) == (20e-6, 110e-6)
    assert issue_times(p, tokens=8) == issue_times(p) == (130e-6, 230e-6)
    older = dataclasses.replace(p, graph_unit_issue_s=None, graph_streamed_issue_s=None)
    assert issue_times(older, tokens=1) == (130e-6, 230e-6)
