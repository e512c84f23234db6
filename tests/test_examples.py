"""The examples and the figure script run in-process on tiny checkpoints or the embedded default model."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from smollm2_markers import needs_smollm2_package

ROOT = Path(__file__).resolve().parent.parent


def load(relative: str):
    """Import a script that is not in a package (examples/*.py, scripts/*.py) as a module."""
    path = ROOT / relative
    name = "example_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smollm2_dir():
    from hf_hybrid.default_model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="module")
def moe_with_tokenizer(smollm2_dir, tmp_path_factory):
    """A tiny random Mixtral whose vocabulary is SmolLM2's, saved with SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        initializer_range=0.15,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    directory = tmp_path_factory.mktemp("moe-tok")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def units_per_home(text: str) -> dict[str, int]:
    """Parse ``units per home: gpu 36, cpu 90, stream 56`` from a printed plan."""
    line = next(line for line in text.splitlines() if line.startswith("units per home:"))
    pairs = [part.split() for part in line.split(":", 1)[1].split(",")]
    return {home: int(count) for home, count in pairs}


def offloading_budget(directory, dtype, max_context: int) -> int:
    """A budget that holds everything but about half of the experts (plus staging slots for them)."""
    from hf_hybrid import HybridModelForCausalLM

    whole = HybridModelForCausalLM.plan(
        str(directory), gpu_memory="1GiB", device="cpu", dtype=dtype, max_context=max_context
    )
    experts = [u.nbytes for u in whole.units if u.kind == "expert"]
    return whole.device_bytes - sum(experts) // 2 + 3 * max(experts)


# ------------------------------------------------------------------------------------------ quickstart
@needs_smollm2_package
def test_quickstart_generates_and_prints_the_plan(capsys):
    quickstart = load("examples/quickstart.py")
    argv = ["--device", "cpu", "--dtype", "float32", "--gpu-memory", "300MiB", "--max-context", "256"]
    assert quickstart.main([*argv, "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is")
    assert "Paris" in out.split("hf_hybrid plan")[0]
    assert "device budget 300.0 MiB" in out
    homes = units_per_home(out)
    assert homes["gpu"] > 0 and homes["cpu"] + homes["stream"] > 0, homes
    assert "executor:" in out


# ---------------------------------------------------------------------------------------- mixtral_24gb
def test_mixtral_plan_only_from_a_config(tmp_path, capsys):
    from transformers import MixtralConfig

    MixtralConfig().save_pretrained(tmp_path)  # Mixtral-8x7B's shapes: no weights anywhere
    mixtral = load("examples/mixtral_24gb.py")
    assert mixtral.main([str(tmp_path), "--plan-only"]) == 0
    out = capsys.readouterr().out
    assert "hf_hybrid plan" in out and "lm_head" in out and "layers.31.experts" in out
    assert "device budget 22.0 GiB" in out
    homes = units_per_home(out)
    assert homes["gpu"] > 0 and homes["cpu"] + homes["stream"] > 0, homes
    if not torch.cuda.is_available():
        assert "built-in default figures" in out and "device=cuda" in out
    assert "host memory the weights need:" in out


def test_mixtral_plan_only_json(tiny_checkpoints, capsys):
    directory = tiny_checkpoints["mixtral"]
    budget = offloading_budget(directory, torch.bfloat16, 64)
    mixtral = load("examples/mixtral_24gb.py")
    argv = [str(directory), "--plan-only", "--json", "--device", "cpu", "--max-context", "64"]
    assert mixtral.main([*argv, "--gpu-memory", str(budget)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["budget"]["total"] == budget
    assert plan["budget"]["free"] >= 0
    assert {u["home"] for u in plan["units"]} <= {"gpu", "cpu", "stream"}
    experts = [u for u in plan["units"] if u["kind"] == "expert"]
    assert any(u["home"] == "gpu" for u in experts) and any(u["home"] != "gpu" for u in experts)


@needs_smollm2_package
def test_mixtral_example_generates_with_a_streamer(moe_with_tokenizer, capsys):
    """The load-and-generate path of mixtral_24gb.py, on a tiny Mixtral with a real tokenizer."""
    budget = offloading_budget(moe_with_tokenizer, torch.bfloat16, 128)
    mixtral = load("examples/mixtral_24gb.py")
    argv = [str(moe_with_tokenizer), "--device", "cpu", "--gpu-memory", str(budget), "--max-context", "128"]
    assert mixtral.main([*argv, "--prompt", "Hello", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "hf_hybrid plan" in out
    homes = units_per_home(out)
    assert homes["cpu"] + homes["stream"] > 0, homes
    continuation = out.split("\nHello", 1)[1]  # the prompt, then the streamed text
    assert continuation.strip()


# ----------------------------------------------------------------------------------------- chat_stream
@needs_smollm2_package
def test_chat_stream_once(capsys):
    chat = load("examples/chat_stream.py")
    argv = ["--device", "cpu", "--dtype", "float32", "--gpu-memory", "300MiB", "--max-context", "256"]
    assert chat.main([*argv, "--max-new-tokens", "12", "--once", "What is the capital of France?"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out


@needs_smollm2_package
def test_chat_stream_interactive_keeps_history(monkeypatch, capsys):
    chat = load("examples/chat_stream.py")
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\nAnd of Italy?\n\n"))
    argv = ["--device", "cpu", "--dtype", "float32", "--gpu-memory", "300MiB", "--max-context", "256"]
    assert chat.main([*argv, "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "units per home" in out
    first, second = out.split("> ")[1:3]
    assert "Paris" in first
    assert "Rome" in second  # answerable only with the first turn in the history


# ------------------------------------------------------------------------------------------- calibrate
@needs_smollm2_package
def test_calibrate_prints_hot_experts_and_saves_frequencies(
    moe_with_tokenizer, tmp_path, capsys, monkeypatch
):
    calibrate = load("examples/calibrate.py")
    budget = offloading_budget(moe_with_tokenizer, torch.float32, 128)
    argv = [str(moe_with_tokenizer), "--device", "cpu", "--gpu-memory", str(budget), "--max-context", "128"]
    assert calibrate.main([*argv, "--top", "3", "--save", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "routing frequencies of 16 experts over 6 texts" in out
    rows = [line for line in out.splitlines() if line.startswith("layers.")]
    assert len(rows) == 6  # 3 hottest per layer, 2 layers
    assert all(" -> " in row for row in rows)
    assert "expert work on resident experts" in out
    frequencies = json.loads((tmp_path / "a.json").read_text())
    assert len(frequencies) == 16
    for layer in (0, 1):
        total = sum(v for k, v in frequencies.items() if k.startswith(f"layers.{layer}.experts."))
        assert total == pytest.approx(2.0)  # top-2 routing: each token picks two experts

    # without model.calibrate (older hf_hybrid): hooks on mlp.experts count the same routing
    from hf_hybrid.runtime import HybridGenerationMixin

    monkeypatch.setattr(HybridGenerationMixin, "calibrate", None, raising=False)
    assert calibrate.main([*argv, "--save", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "counted with hooks on mlp.experts" in out
    assert json.loads((tmp_path / "b.json").read_text()) == pytest.approx(frequencies)


@pytest.mark.filterwarnings("ignore:hf_hybrid. the whole model fits")
def test_calibrate_refuses_a_dense_model(tiny_checkpoints, capsys):
    calibrate = load("examples/calibrate.py")
    argv = [str(tiny_checkpoints["llama"]), "--device", "cpu", "--gpu-memory", "17MiB", "--max-context", "64"]
    assert calibrate.main(argv) == 2
    assert "no MoE layers" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- figures
def test_make_figures(tmp_path, capsys):
    figures = load("scripts/make_figures.py")
    assert figures.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in out
        return
    assert (tmp_path / "lanes.png").stat().st_size > 10_000
    records = figures.load_records(ROOT / "docs" / "data")
    for scenario in records:
        assert (tmp_path / f"{scenario.lower()}.png").exists()
    assert "S1" in records


def test_make_figures_without_matplotlib(tmp_path, capsys, monkeypatch):
    figures = load("scripts/make_figures.py")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert figures.main(["--out", str(tmp_path)]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_prefill_vs_prompt_figure_plots_the_runs_and_both_bounds(tmp_path):
    from unittest.mock import MagicMock

    figures = load("scripts/make_figures.py")

    def record(prompt, rate, bound, combined, baselines=()):
        rows = [
            {
                "engine": "hf_hybrid",
                "status": "ok",
                "prompt": prompt,
                "prefill_tok_s": rate,
                "prefill_bound_tok_s": bound,
                "prefill_cpu_pcie_bound_tok_s": combined,
            }
        ]
        rows += [{"engine": e, "status": "ok", "prompt": 128, "prefill_tok_s": r} for e, r in baselines]
        rows.append({"engine": "gpu", "status": "error"})
        return (f"s1-{prompt}", {"header": {"scenario": "S1", "date": "2026-12-04 13:00"}, "rows": rows})

    records = [
        record(512, 1500.0, 1520.0, 2030.0, [("accelerate", 50.0), ("cpu", 220.0)]),
        record(2048, 5000.0, 5860.0, 6100.0),
    ]
    plt = MagicMock()
    fig, ax = MagicMock(), MagicMock()
    plt.subplots.return_value = (fig, ax)
    assert figures.prefill_length_figure(plt, records, tmp_path / "p.png")
    lines = {call.kwargs.get("label"): call.args for call in ax.plot.call_args_list}
    assert lines["hf_hybrid (measured)"][:2] == ([512, 2048], [1500.0, 5000.0])
    assert lines["bound: PCIe only"][:2] == ((512, 2048), (1520.0, 5860.0))
    assert lines["bound: CPU + PCIe"][:2] == ((512, 2048), (2030.0, 6100.0))
    assert lines["accelerate offload"][:2] == ((128,), (50.0,))
    assert lines["CPU only"][:2] == ((128,), (220.0,))
    fig.savefig.assert_called_once()
    # one prompt length is not a curve
    assert not figures.prefill_length_figure(plt, records[:1], tmp_path / "q.png")
