"""The ``hf-hybrid`` command line, called in-process through ``main([...])``.

The embedded SmolLM2 is converted once into the ordinary cache (``$HF_HYBRID_CACHE`` or
``~/.cache/hf_hybrid``) and reused by every test here; ``profile`` and ``bench`` write into tmp dirs.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from smollm2_markers import needs_smollm2

from hf_hybrid.cli import build_parser, main

HAS_CUDA = torch.cuda.is_available()
#: The INFO line from_pretrained logs after loading (shown with -v).
LOAD_SUMMARY = re.compile(r"^hf_hybrid: .*budget 200\.0 MiB", re.MULTILINE)


@pytest.fixture(scope="module")
def smollm2_dir():
    """The converted default model (the conversion, ~20 s, happens here once on a fresh machine)."""
    from hf_hybrid.default_model import default_model_dir

    return default_model_dir()


def run(capsys, *argv):
    """``main(argv)`` -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: action.load(name) for name in list(action.choices)}  # profile/bench are built on demand


# ---------------------------------------------------------------------------------------------- help
def test_top_level_help_lists_every_subcommand(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name in ("generate", "plan", "serve", "profile", "bench"):
        assert name in out
    assert "--verbose" in out


@pytest.mark.parametrize("command", ["generate", "plan", "serve", "profile", "bench"])
def test_subcommand_help_mentions_every_option(capsys, command):
    subparser = _subcommands()[command]
    code, out, err = run(capsys, command, "--help")
    assert code == 0 and err == ""
    options = [s for a in subparser._actions for s in a.option_strings]
    assert "--verbose" in options
    for option in options:
        assert option in out, f"{command} --help does not mention {option}"
    for action in subparser._actions:
        assert action.help, f"{command}: {action.dest} has no help text"


# ------------------------------------------------------------------------------------------ generate
@needs_smollm2
def test_generate_default_model_streams_text(capsys, smollm2_dir):
    code, out, err = run(capsys, "generate", "--device", "cpu", "--max-new-tokens", 6, "--top-k", 5)
    assert code == 0
    assert out.startswith("The capital of France is") and "Paris" in out  # streamed prompt + completion
    assert out.endswith("\n")
    notes = [line for line in err.splitlines() if "--gpu-memory" in line]
    assert len(notes) == 1 and notes[0].startswith("hf-hybrid: note:")  # the whole model is resident
    assert "nothing is offloaded" not in err  # covered by the note, not repeated as a warning
    assert "budget" not in err  # the INFO load summary needs -v
    assert "decoding greedily" in err  # --top-k without --temperature


@needs_smollm2
def test_generate_trace_writes_a_timeline(capsys, smollm2_dir, tmp_path):
    trace = tmp_path / "trace.json"
    code, out, err = run(
        capsys,
        "generate",
        "--gpu-memory",
        "200MiB",
        "--max-context",
        256,
        "--max-new-tokens",
        3,
        "--trace",
        trace,
    )
    assert code == 0 and "Paris" in out
    assert f"trace written to {trace}" in err
    lanes = {e["tid"] for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"}
    assert len(lanes) == 4  # host, CPU lane, PCIe copy, GPU


@needs_smollm2
def test_generate_json_hybrid_path_matches_transformers(capsys, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out, err = run(
        capsys,
        "-v",
        "generate",
        "--gpu-memory",
        "200MiB",
        "--max-context",
        256,
        "--dtype",
        "float32",
        "--max-new-tokens",
        6,
        "--json",
        "--show-plan",
    )
    assert code == 0, err
    record = json.loads(out)
    assert record["model"] == str(smollm2_dir)
    assert "Paris" in record["completion"] and len(record["tokens"]) == 6
    assert record["homes"]["gpu"] > 0 and record["homes"]["cpu"] + record["homes"]["stream"] > 0
    assert "hf_hybrid plan" in err and "units per home" in err  # --show-plan table on stderr
    assert LOAD_SUMMARY.search(err)  # -v: the INFO load summary
    assert "note:" not in err  # a budget was given: no suggestion to give one

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    inputs = tok(record["prompt"], return_tensors="pt")
    want = ref.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert record["tokens"] == want[0, inputs["input_ids"].shape[1] :].tolist()


@needs_smollm2
def test_generate_chat_sampling_is_seeded_and_streams_the_same_text(capsys, smollm2_dir):
    common = [
        "generate",
        "--gpu-memory",
        "200MiB",
        "--max-context",
        256,
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        0.7,
        "--top-k",
        5,
        "--seed",
        0,
        "--max-new-tokens",
        8,
    ]
    code, out, err = run(capsys, *common, "--json", "-v")  # -v after the subcommand works too
    assert code == 0
    assert LOAD_SUMMARY.search(err)
    first = json.loads(out)
    assert first["chat"] is True and len(first["tokens"]) > 0
    code, streamed, _ = run(capsys, *common)
    assert code == 0
    assert "<|im_start|>" not in streamed and "user" not in streamed  # the template is not echoed
    assert streamed.strip() == first["completion"].strip()  # same seed, same tokens


# ---------------------------------------------------------------------------------------------- plan
def _strict(text: str):
    """``json.loads`` that rejects the non-standard Infinity/NaN (jq and JavaScript do)."""

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def _config_only(tmp_path, directory) -> Path:
    target = tmp_path / "config-only"
    target.mkdir()
    (target / "config.json").write_text((Path(directory) / "config.json").read_text())
    return target


PLAN_OPTIONS = ["--gpu-memory", "16.9MiB", "--max-context", 64, "--device", "cpu"]


def test_plan_tiny_checkpoint_text_and_json(capsys, tiny_checkpoints):
    directory = tiny_checkpoints["mixtral"]
    code, out, err = run(capsys, "plan", directory, *PLAN_OPTIONS)
    assert code == 0, err
    assert "hf_hybrid plan" in out and "experts" in out and "units per home" in out
    code, out, err = run(capsys, "plan", directory, *PLAN_OPTIONS, "--json")
    assert code == 0, err
    plan = _strict(out)
    homes = {u["home"] for u in plan["units"]}
    assert "gpu" in homes and homes & {"cpu", "stream"}  # the small budget offloads part of it


def test_plan_prefill_chunk_sizes_the_workspace(capsys, tiny_checkpoints):
    directory = tiny_checkpoints["mixtral"]
    code, out, err = run(capsys, "plan", directory, *PLAN_OPTIONS, "--prefill-chunk", 4, "--json")
    assert code == 0, err
    chunked = _strict(out)
    code, out, _ = run(capsys, "plan", directory, *PLAN_OPTIONS, "--json")
    whole = _strict(out)
    assert chunked["prefill_chunk"] == 4 and whole["prefill_chunk"] > 4
    assert chunked["budget"]["workspace"] < whole["budget"]["workspace"]
    code, out, _ = run(capsys, "plan", directory, *PLAN_OPTIONS, "--prefill-chunk", 4)
    assert "prefilled in chunks of that size" in out and "each 1k positions" in out
    code, _, err = run(capsys, "plan", directory, *PLAN_OPTIONS, "--prefill-chunk", 0)
    assert code == 2 and "prefill-chunk" in err


def test_plan_config_only_dir_needs_no_weights(capsys, tiny_checkpoints, tmp_path):
    directory = tiny_checkpoints["qwen3_moe"]
    config_only = _config_only(tmp_path, directory)
    code, out, err = run(capsys, "plan", config_only, *PLAN_OPTIONS, "--json")
    assert code == 0, err
    from_config = json.loads(out)
    code, out, _ = run(capsys, "plan", directory, *PLAN_OPTIONS, "--json")
    assert from_config == json.loads(out)
    code, out, _ = run(capsys, "plan", config_only, *PLAN_OPTIONS)
    assert code == 0 and "hf_hybrid plan" in out


def test_plan_without_budget_on_cpu_notes_everything_resident(capsys, tiny_checkpoints):
    directory = tiny_checkpoints["llama"]
    code, out, err = run(capsys, "plan", directory, "--device", "cpu", "--max-context", 64, "--json")
    assert code == 0
    assert {u["home"] for u in _strict(out)["units"]} == {"gpu"}
    assert len(err.splitlines()) == 1
    suggested = re.search(r"--gpu-memory (\d+(?:\.\d)?[MG]iB)", err).group(1)
    code, out, err = run(
        capsys, "plan", directory, "--device", "cpu", "--max-context", 64, "--json", "--gpu-memory", suggested
    )
    assert code == 0 and err == ""
    assert {u["home"] for u in json.loads(out)["units"]} & {"cpu", "stream"}  # the suggestion offloads


def test_plan_for_a_gpu_this_machine_lacks(capsys, tiny_checkpoints):
    code, out, err = run(
        capsys,
        "plan",
        tiny_checkpoints["olmoe"],
        "--device",
        "cuda",
        "--gpu-memory",
        "24MiB",
        "--max-context",
        64,
    )
    assert code == 0, err
    assert "hf_hybrid plan" in out


@needs_smollm2
def test_plan_default_model(capsys, smollm2_dir):
    code, out, err = run(capsys, "plan", "--gpu-memory", "200MiB", "--max-context", 256, "--json")
    assert code == 0, err
    names = {u["name"] for u in json.loads(out)["units"]}
    assert "layers.29.attention" in names  # SmolLM2-135M has 30 layers


# ------------------------------------------------------------------------------------ profile, bench
def test_profile_quick_json(capsys, tmp_path):
    code, out, err = run(capsys, "profile", "--quick", "--json", "--device", "cpu", "--cache-dir", tmp_path)
    assert code == 0, err
    profile = json.loads(out)
    assert profile["device"] == "cpu" and profile["measured"] is True
    assert len(list(tmp_path.glob("*.json"))) == 1  # cached where asked
    code, again, _ = run(capsys, "profile", "--quick", "--json", "--device", "cpu", "--cache-dir", tmp_path)
    assert code == 0 and json.loads(again) == profile  # read back, not measured again
    code, table, _ = run(capsys, "profile", "--quick", "--device", "cpu", "--cache-dir", tmp_path)
    assert code == 0 and "Hardware profile" in table


def test_bench_tiny_moe(capsys, tmp_path):
    out_json = tmp_path / "out.json"
    code, out, err = run(
        capsys,
        "bench",
        "--scenario",
        "tiny-moe",
        "--engines",
        "cpu,hf_hybrid",
        "--device",
        "cpu",
        "--cache-dir",
        tmp_path / "cache",
        "--json",
        out_json,
    )
    assert code == 0, err
    record = json.loads(out_json.read_text())
    assert record["header"]["scenario"] == "tiny-moe"
    assert {row["engine"]: row["status"] for row in record["rows"]} == {"cpu": "ok", "hf_hybrid": "ok"}
    assert "| hf_hybrid |" in out


# -------------------------------------------------------------------------------------------- errors
def _bad_inputs(tmp_path, tiny_checkpoints):
    """name -> (argv, a fragment the error line must contain)."""
    no_config = tmp_path / "empty"
    no_config.mkdir()
    llama = Path(tiny_checkpoints["llama"])
    config_only = _config_only(tmp_path, llama)
    cases = {
        "unreadable budget": (["generate", "--gpu-memory", "lots"], "--gpu-memory: cannot read 'lots'"),
        "zero budget": (["plan", llama, "--gpu-memory", "0"], "must be positive"),
        "missing model dir": (["generate", tmp_path / "nope"], "no such directory"),
        "missing plan dir": (["plan", "./no/such/model"], "no such directory"),
        "dir without config": (["plan", no_config], "has no config.json"),
        "model is a file": (["plan", llama / "config.json"], "is a file"),
        "no weights": (["generate", config_only, "--device", "cpu"], "holds no weights"),
        "no tokenizer": (["generate", llama, "--device", "cpu"], "has no tokenizer"),
        "zero new tokens": (["generate", "--max-new-tokens", "0"], "--max-new-tokens"),
        "bad dtype": (["plan", "--dtype", "float8"], "invalid choice"),
        "bad top-p": (["generate", "--top-p", "1.5"], "--top-p"),
        "bad device": (["generate", "--device", "gpu"], "expected cpu, cuda or cuda:N"),
        "unknown option": (["plan", "--frobnicate"], "unrecognized arguments"),
        "unknown command": (["frobnicate"], "invalid choice"),
        "bench scenario": (["bench", "--scenario", "nope", "--cache-dir", tmp_path], "nope"),
    }
    if not HAS_CUDA:
        cases["plan cuda without budget"] = (["plan", llama, "--device", "cuda"], "pass --gpu-memory")
    return cases


def test_bad_input_exits_2_with_one_line(capsys, tmp_path, tiny_checkpoints):
    for name, (argv, fragment) in _bad_inputs(tmp_path, tiny_checkpoints).items():
        code, out, err = run(capsys, *argv)
        assert code == 2, (name, code, err)
        assert out == "", name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hf-hybrid") and "error" in lines[0], (name, err)
        assert fragment in lines[0], (name, err)


@needs_smollm2
def test_errors_from_the_library_exit_2(capsys, smollm2_dir):
    cases = [
        # prompt + new tokens past the KV cache: ContextLengthError from generate
        ["generate", "--device", "cpu", "--max-context", 8, "--max-new-tokens", 16],
    ]
    if not HAS_CUDA:
        cases.append(["generate", "--device", "cuda", "--max-new-tokens", 1])  # DeviceUnavailableError
    for argv in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        errors = [line for line in err.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("hf-hybrid generate: error:"), err
        assert "Traceback" not in err


def test_console_script_points_at_main():
    """The ``hf-hybrid`` script runs ``sys.exit(main())``: main returns the exit code, never raises it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["hf-hybrid"] == "hf_hybrid.cli:main"
