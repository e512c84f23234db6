"""The diagnostic scripts in benchmarks/ run end to end on a tiny scenario (CPU standing in)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HYBRID_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_trace_scenario_writes_a_timeline_per_mode(tmp_path):
    out = _run(
        tmp_path,
        str(ROOT / "benchmarks" / "trace_scenario.py"),
        "--scenario", "tiny-moe", "--gpu-memory", "18MiB", "--modes", "adaptive,stream",
        "--new-tokens", "3", "--out", str(tmp_path / "t.json"),
    )  # fmt: skip
    for mode in ("adaptive", "stream"):
        events = json.loads((tmp_path / f"t.{mode}.json").read_text())["traceEvents"]
        assert any(e.get("name", "").startswith("forward") for e in events)
        assert f"{mode}: lanes" in out


def test_step_profile_prints_the_parts_of_a_decode_step(tmp_path):
    out = _run(
        tmp_path,
        str(ROOT / "benchmarks" / "step_profile.py"),
        "--scenario", "tiny-moe", "--gpu-memory", "18MiB", "--modes", "adaptive,static",
        "--new-tokens", "4", "--profile-steps", "2", "--out-dir", str(tmp_path),
    )  # fmt: skip
    assert "| start -> layer 0 |" in out and "| adaptive | static |" in out
    assert (tmp_path / "tiny-moe-steps.profile.json").exists()


def test_cpu_lane_memory_probe_prints_a_rate_per_method(tmp_path):
    out = _run(
        tmp_path,
        str(ROOT / "benchmarks" / "cpu_lane_memory.py"),
        "--hidden", "64", "--inter", "128", "--experts", "2", "--seconds", "0.05",
    )  # fmt: skip
    assert "| ordinary | linear |" in out


def test_streamed_issue_probe_needs_a_cuda_device(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("the probe's CUDA run is checked on the device machine")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "streamed_issue.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0 and "needs a CUDA device" in done.stderr


def test_streamed_issue_probe_measures_beside_a_running_cpu_lane():
    import importlib.util

    import pytest

    from hf_hybrid.kernels import native

    if not native.available():
        pytest.skip(f"native kernel unavailable: {native.unavailable_reason()}")
    spec = importlib.util.spec_from_file_location("streamed_issue", ROOT / "benchmarks" / "streamed_issue.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)

    def measure():
        time.sleep(0.05)  # the lane computes meanwhile
        return [1e-5, 2e-5]

    times, rate = probe._beside_cpu_lane(measure, 64, 32, experts=3)
    assert times == [1e-5, 2e-5] and rate > 0


def test_scripts_import_hf_hybrid_before_torch():
    # OpenMP reads OMP_WAIT_POLICY once, when torch loads it: hf_hybrid can only make it passive if it is
    # imported first (the traces and probes of 2026-11-25 ran with spinning threads for want of this)
    import ast

    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(script.read_text())
        imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [n.names[0].name if isinstance(n, ast.Import) else n.module for n in imports]
        names = [n for n in names if n != "__future__"]
        if "torch" in names:
            assert names[0] == "hf_hybrid", script.name
