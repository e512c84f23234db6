"""The command line without a network or a GPU: hub failures fast and clear, quiet pipes, fast --help,
and the notes a plan prints about the machine it runs on."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_hybrid.cli import main, readable_size

ROOT = Path(__file__).resolve().parent.parent
HUB_ID = "hf-hybrid-tests/no-such-model"


def run(capsys, *argv):
    """``main(argv)`` -> (exit code, stdout, stderr, seconds)."""
    start = time.perf_counter()
    code = main([str(a) for a in argv])
    seconds = time.perf_counter() - start
    out, err = capsys.readouterr()
    return code, out, err, seconds


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """Every snapshot download fails as it does without a network (cache lookups find nothing)."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, *args, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # huggingface_hub read HF_HUB_OFFLINE when it was imported (CI runs with it set): online for this test
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    return calls


def assert_unreachable(err: str) -> None:
    assert err.count("\n") == 1, err  # one line
    assert HUB_ID in err and "could not reach the Hugging Face hub" in err
    assert "HF_HUB_OFFLINE=1" in err and "'hf-hybrid plan' also works from a local directory" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------ the hub
@pytest.mark.parametrize("command", ["plan", "generate"])
def test_unreachable_hub_fails_fast_and_says_how_to_work_offline(capsys, no_hub, command):
    code, out, err, seconds = run(capsys, command, HUB_ID, "--gpu-memory", "24GiB")
    assert code == 2 and out == ""
    assert_unreachable(err)
    assert seconds < 5
    assert no_hub[0] is True  # the cache was asked before the network


@pytest.mark.parametrize("command", ["plan", "generate"])
def test_offline_hub_id_fails_fast_without_network(capsys, monkeypatch, tmp_path, command):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    code, _, err, seconds = run(capsys, command, HUB_ID, "--gpu-memory", "24GiB")
    assert code == 2 and seconds < 5
    assert HUB_ID in err and "HF_HUB_OFFLINE" in err and "not in the Hugging Face cache" in err
    assert "'hf-hybrid plan' also works from a local directory holding only config.json" in err


def test_plan_reads_a_cached_config_without_the_network(capsys, monkeypatch, tiny_checkpoints, tmp_path):
    import huggingface_hub

    cached = tmp_path / "snapshot"
    cached.mkdir()
    shutil.copy(tiny_checkpoints["mixtral"] / "config.json", cached / "config.json")

    def snapshot_download(repo_id, *args, local_files_only=False, **kwargs):
        assert local_files_only, "the network was asked although the cache holds the config"
        return str(cached)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    code, out, err, _ = run(capsys, "plan", HUB_ID, "--device", "cpu", "--gpu-memory", "20.7MiB")
    assert code == 0, err
    assert "hf_hybrid plan" in out


def test_example_prints_the_hub_message_not_a_traceback(capsys, no_hub):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import mixtral_24gb
    finally:
        sys.path.pop(0)
    start = time.perf_counter()
    code = mixtral_24gb.main([HUB_ID, "--plan-only"])
    assert time.perf_counter() - start < 5
    _, err = capsys.readouterr()
    assert code == 2
    assert HUB_ID in err and "HF_HUB_OFFLINE=1" in err and "config.json" in err


# ---------------------------------------------------------------------------------- process behaviour
def test_closed_pipe_exits_quietly(tiny_checkpoints):
    # the reader closes its end at once, as `| head -0` would; the plan is many lines
    proc = subprocess.Popen(
        [sys.executable, "-m", "hf_hybrid.cli", "plan", str(tiny_checkpoints["mixtral"]), "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    code = proc.wait(timeout=120)
    assert code in (0, 141), err
    assert "Broken pipe" not in err and "Traceback" not in err and "BrokenPipeError" not in err


def test_parser_and_help_import_no_torch():
    script = (
        "import sys, contextlib, io; from hf_hybrid.cli import build_parser, main; build_parser(); "
        "f = io.StringIO()\n"
        "with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):\n"
        "    codes = [main(['--help']), main(['plan', '--no-such-option'])]\n"
        "print(codes, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["[0,", "2]", "False", "False"], out.stderr


# ------------------------------------------------------------------------------------ plan notes
def test_plan_notes_the_cpu_standing_in(capsys, monkeypatch, tiny_checkpoints):
    import hf_hybrid.devices

    monkeypatch.setattr(hf_hybrid.devices, "default_device_name", lambda: "cpu")
    code, _, err, _ = run(capsys, "plan", tiny_checkpoints["mixtral"])
    assert code == 0
    assert "no GPU here" in err and "--device cuda --gpu-memory SIZE" in err
    # chosen explicitly: no such note
    code, _, err, _ = run(
        capsys, "plan", tiny_checkpoints["mixtral"], "--device", "cpu", "--gpu-memory", "20.7MiB"
    )
    assert code == 0 and "no GPU here" not in err


def test_plan_notes_host_memory_shortfall(capsys, monkeypatch, tiny_checkpoints):
    import hf_hybrid.system

    monkeypatch.setattr(hf_hybrid.system, "meminfo", lambda key: 1024 if key == "MemTotal" else None)
    code, _, err, _ = run(
        capsys, "plan", tiny_checkpoints["mixtral"], "--device", "cpu", "--gpu-memory", "20.7MiB"
    )
    assert code == 0
    assert "in host memory" in err and "1.0 KiB of RAM" in err


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (253730 * 1024, "248MiB"),
        (300 * 1024, "0.3MiB"),
        (int(120.6 * 1024**2), "121MiB"),
        (int(20.66 * 1024**2), "20.7MiB"),
        (1024**3 - 1, "1024MiB"),
        (1024**3, "1.0GiB"),
        (int(23.46 * 1024**3), "23.5GiB"),
    ],
)
def test_suggested_budgets_are_readable(nbytes, text):
    assert readable_size(nbytes) == text


def test_plan_says_why_a_rate_beats_its_bound(tiny_checkpoints):
    from hf_hybrid import HybridModelForCausalLM

    plan = HybridModelForCausalLM.plan(tiny_checkpoints["mixtral"], device="cpu", gpu_memory="20.7MiB")
    assert plan.units_in("cpu"), "this budget should leave some units on the CPU"
    plan.predicted.update(prefill_bound_tok_s=100.0, prefill_tok_s=105.0, prefill_fraction_of_bound=1.05)
    line = next(x for x in str(plan).splitlines() if x.startswith("predicted prefill"))
    assert "105%" in line and "counts PCIe transfers only" in line and "on the CPU" in line
    plan.predicted.update(prefill_tok_s=95.0, prefill_fraction_of_bound=0.95)
    line = next(x for x in str(plan).splitlines() if x.startswith("predicted prefill"))
    assert "95%" in line and "PCIe transfers only" not in line
    # decode above its first bound (torch's GEMV rate) and below the native lane's: both figures, and why
    plan.predicted.update(
        decode_bound_tok_s=20.0,
        decode_native_bound_tok_s=30.0,
        decode_tok_s=24.0,
        decode_fraction_of_bound=1.2,
    )
    line = next(x for x in str(plan).splitlines() if x.startswith("predicted decode"))
    assert "120%" in line and "torch's kernel rate" in line and "native-lane bound 30.00, 80%" in line
