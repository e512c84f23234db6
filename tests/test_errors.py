"""Bad input: every mistake a caller can make is refused early, with an hf_hybrid error that subclasses the
built-in a caller would catch and a message saying what was wrong and what to do."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, load_every_lane
from transformers import AutoModelForCausalLM

import hf_hybrid.loading as loading
from hf_hybrid import (
    BudgetError,
    CheckpointError,
    ContextLengthError,
    DeviceUnavailableError,
    HostMemoryError,
    HybridError,
    HybridModelForCausalLM,
    UnsupportedModelError,
    WeightsNotFoundError,
)
from hf_hybrid.checkpoint import CheckpointReader, PickleCheckpointReader
from hf_hybrid.loading import check_host_memory
from hf_hybrid.units import parse_bytes

load = load_every_lane  # every lane in use: forced mixed homes, static assignment, float32


def prompt(batch=1, length=8, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def mixtral_copy(tiny_checkpoints, tmp_path):
    """A private copy of the tiny Mixtral checkpoint a test may damage."""
    return copy_checkpoint(tiny_checkpoints["mixtral"], tmp_path / "mixtral")


# ------------------------------------------------------------------------------------------- paths
def test_missing_local_path_is_weights_not_found(tmp_path):
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match="no such directory") as info:
        load(tmp_path / "does-not-exist")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, HybridError)
    assert "hub id" in str(info.value)
    assert time.perf_counter() - start < 5


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to resolve or connect to a host."""
    attempts = []

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "network disabled in this test")

    def connect(self, address):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.mark.parametrize("repo_id", ["hf-hybrid-tests/no-such-model", "no-such-model-without-owner"])
def test_unknown_hub_id_offline_fails_fast_without_network(monkeypatch, tmp_path, no_network, repo_id):
    # set after huggingface_hub was imported: hf_hybrid must read it at call time
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # a bare name is a hub id (like "gpt2") unless such a directory exists
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        load(repo_id, cache_dir=tmp_path / "cache")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert repo_id in message and "HF_HUB_OFFLINE" in message
    assert "not in the Hugging Face cache" in message and "local directory" in message
    assert no_network == [], f"offline mode still tried the network: {no_network}"


def test_unknown_hub_id_local_files_only(tmp_path, no_network):
    with pytest.raises(WeightsNotFoundError, match="local_files_only=True"):
        load("hf-hybrid-tests/no-such-model", cache_dir=tmp_path / "cache", local_files_only=True)
    assert no_network == []


def test_invalid_hub_id_is_weights_not_found(monkeypatch, tmp_path, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="valid Hugging Face hub id"):
        load("owner/has spaces!", cache_dir=tmp_path / "cache")


def test_directory_with_config_only(tiny_checkpoints, tmp_path):
    shutil.copy(tiny_checkpoints["mixtral"] / "config.json", tmp_path / "config.json")
    with pytest.raises(WeightsNotFoundError, match=r"has config.json but no weights") as info:
        load(tmp_path)
    assert "*.safetensors" in str(info.value) and str(tmp_path) in str(info.value)


def test_directory_without_config(tiny_checkpoints, tmp_path):
    shutil.copy(tiny_checkpoints["mixtral"] / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(WeightsNotFoundError, match="has no config.json"):
        load(tmp_path)


def test_unreadable_config_is_checkpoint_error(mixtral_copy):
    (mixtral_copy / "config.json").write_text('{"model_type": "mixtral", ')
    with pytest.raises(CheckpointError, match="config.json"):
        load(mixtral_copy)


@pytest.mark.parametrize("with_weights", [False, True])
def test_unsupported_architecture_lists_supported_families(tmp_path, with_weights):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    if with_weights:
        GPT2LMHeadModel(config).save_pretrained(tmp_path)
    else:
        config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="model_type='gpt2'") as info:
        load(tmp_path)
    assert isinstance(info.value, ValueError)
    for family in ("Mixtral", "Qwen3-MoE", "OLMoE", "llama", "mistral", "qwen2"):
        assert family in str(info.value)


# -------------------------------------------------------------------------------------- gpu_memory
@pytest.mark.parametrize(
    "value, error, pattern",
    [
        ("lots", ValueError, r"cannot read gpu_memory='lots'.*'6GiB'"),
        ("-5GiB", ValueError, r"cannot read gpu_memory"),
        (-1, ValueError, r"gpu_memory must not be negative"),
        (0, BudgetError, r"gpu_memory must be positive.*gpu_memory='6GiB'"),
        ("0MiB", BudgetError, r"gpu_memory must be positive"),
        (True, TypeError, r"gpu_memory must be a number of bytes.*not a bool"),
        ([1], TypeError, r"gpu_memory must be a number of bytes"),
    ],
)
def test_bad_gpu_memory(tiny_checkpoints, value, error, pattern):
    with pytest.raises(error, match=pattern):
        load(tiny_checkpoints["mixtral"], gpu_memory=value, placement=None)


def test_gpu_memory_below_minimum_states_the_minimum(tiny_checkpoints):
    directory = tiny_checkpoints["mixtral"]
    with pytest.raises(BudgetError, match="below the minimum") as info:
        load(directory, gpu_memory="1MiB", placement=None)
    assert isinstance(info.value, ValueError)
    found = re.search(r"at least ([0-9.]+ [KMG]iB)", str(info.value))
    assert found, str(info.value)
    minimum = parse_bytes(found.group(1).replace(" ", ""))
    # the stated minimum (plus its display rounding) is enough
    model = load(directory, gpu_memory=int(minimum * 1.01), placement=None)
    assert model.hybrid_plan.device_bytes <= model.hybrid_plan.budget_bytes


# ------------------------------------------------------------------------------------ host memory
def test_host_memory_shortfall_is_reported(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(loading, "host_memory_available", lambda: 1000)
    with pytest.raises(HostMemoryError, match=r"only 1000 B is available") as info:
        load(tiny_checkpoints["mixtral"])
    assert isinstance(info.value, MemoryError)
    assert re.search(r"keeps [0-9.]+ KiB", str(info.value))


def test_host_memory_counts_the_whole_model_when_the_cpu_stands_in(tiny_checkpoints, monkeypatch):
    """With device='cpu' and no placement everything is 'resident', yet it all lives in host memory."""
    monkeypatch.setattr(loading, "host_memory_available", lambda: 4096)
    with pytest.raises(HostMemoryError, match="whole model lives in host memory"):
        load(tiny_checkpoints["mixtral"], placement=None)


def test_host_memory_on_cuda_counts_only_host_units(tiny_checkpoints, monkeypatch):
    plan = load(tiny_checkpoints["mixtral"]).hybrid_plan
    host = sum(u.nbytes for u in plan.units if plan.homes[u.name] != "gpu")
    total = sum(u.nbytes for u in plan.units)
    assert 0 < host < total
    monkeypatch.setattr(loading, "host_memory_available", lambda: host)
    assert check_host_memory(plan, torch.device("cuda")) == host
    with pytest.raises(HostMemoryError):
        check_host_memory(plan, torch.device("cpu"))
    monkeypatch.setattr(loading, "host_memory_available", lambda: host - 1)
    with pytest.raises(HostMemoryError, match="Raise gpu_memory"):
        check_host_memory(plan, torch.device("cuda"))


# ----------------------------------------------------------------------------------------- pickle
def _pickle_copy(src, dst, shards: int = 1):
    """``dst`` with src's config and its weights as ``pytorch_model*.bin`` (sharded with an index if > 1)."""
    dst.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    state = load_file(src / "model.safetensors")
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[s::shards]}
        torch.save(part, dst / name)
        weight_map.update(dict.fromkeys(part, name))
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_pickle_checkpoint_refused_by_default(tiny_checkpoints, tmp_path):
    directory = _pickle_copy(tiny_checkpoints["mixtral"], tmp_path / "bin")
    with pytest.raises(WeightsNotFoundError, match="allow_pickle=True") as info:
        load(directory)
    assert "pytorch_model.bin" in str(info.value) and "safetensors" in str(info.value)
    # the reader refuses too unless told (or resolve_checkpoint was told) pickle is allowed
    with pytest.raises(WeightsNotFoundError, match="allow_pickle=True"):
        CheckpointReader(directory)


@pytest.mark.parametrize("shards", [1, 3])
def test_pickle_checkpoint_with_allow_pickle_matches_safetensors(
    tiny_checkpoints, tmp_path, monkeypatch, shards
):
    src = tiny_checkpoints["mixtral"]
    directory = _pickle_copy(src, tmp_path / "bin", shards)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    from_bin = load(directory, allow_pickle=True)
    assert len(calls) == shards
    assert all(c.get("weights_only") is True and c.get("mmap") is True for c in calls), calls
    from_safetensors = load(src)
    ids = prompt()
    want = from_safetensors.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(from_bin.generate(ids, max_new_tokens=10, do_sample=False), want)


def test_pickle_reader_has_the_checkpoint_reader_interface(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["llama"]
    directory = _pickle_copy(src, tmp_path / "bin", shards=2)
    ref = CheckpointReader(src)
    reader = CheckpointReader(directory, allow_pickle=True)
    assert isinstance(reader, PickleCheckpointReader) and isinstance(reader, CheckpointReader)
    assert set(reader.keys()) == set(ref.keys())
    key = "model.layers.0.mlp.down_proj.weight"
    assert key in reader and "nope" not in reader
    assert reader.shape(key) == ref.shape(key)
    torch.testing.assert_close(reader.get(key), ref.get(key), rtol=0, atol=0)
    torch.testing.assert_close(reader.get(key, cols=(8, 40)), ref.get(key, cols=(8, 40)), rtol=0, atol=0)
    up = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(reader.get(up, rows=(24, 48)), ref.get(up, rows=(24, 48)), rtol=0, atol=0)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_PICKLE_RAN",))


def test_pickle_with_code_is_refused_even_when_allowed(tiny_checkpoints, tmp_path, monkeypatch):
    directory = tmp_path / "evil"
    directory.mkdir()
    shutil.copy(tiny_checkpoints["mixtral"] / "config.json", directory)
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": _Evil()}, directory / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as info:
        load(directory, allow_pickle=True)
    assert "weights_only=True" in str(info.value)
    assert not (tmp_path / "EVIL_PICKLE_RAN").exists()


def test_truncated_pickle_shard(tiny_checkpoints, tmp_path):
    directory = _pickle_copy(tiny_checkpoints["mixtral"], tmp_path / "bin")
    shard = directory / "pytorch_model.bin"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"cannot read pytorch_model.bin.*download it again"):
        load(directory, allow_pickle=True)


# ------------------------------------------------------------------------------ corrupt safetensors
@pytest.mark.parametrize("damage", ["truncate_half", "truncate_tail", "garbage", "empty"])
def test_corrupt_safetensors_shard(mixtral_copy, damage):
    shard = mixtral_copy / "model.safetensors"
    data = shard.read_bytes()
    damaged = {
        "truncate_half": data[: len(data) // 2],
        "truncate_tail": data[:-100],
        "garbage": os.urandom(4096),
        "empty": b"",
    }[damage]
    shard.write_bytes(damaged)
    with pytest.raises(CheckpointError, match=r"model.safetensors.*(truncated or corrupt)") as info:
        load(mixtral_copy)
    assert isinstance(info.value, ValueError)


def test_index_naming_a_missing_shard(tiny_checkpoints, tmp_path):
    directory = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoints["mixtral"]).save_pretrained(
        directory, max_shard_size="300KB"
    )
    shards = sorted(directory.glob("*.safetensors"))
    assert len(shards) > 1
    assert torch.equal(
        load(directory).generate(prompt(), max_new_tokens=4, do_sample=False),
        load(tiny_checkpoints["mixtral"]).generate(prompt(), max_new_tokens=4, do_sample=False),
    )
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[-1].name}.*download is incomplete"):
        load(directory)


# ------------------------------------------------------------------------------------ wrong shapes
@pytest.mark.parametrize(
    "family, key, shape",
    [
        ("mixtral", "model.layers.0.self_attn.q_proj.weight", (60, 64)),
        ("mixtral", "model.layers.1.block_sparse_moe.experts.1.w1.weight", (90, 64)),
        ("mixtral", "model.layers.0.block_sparse_moe.experts.2.w2.weight", (64, 95)),
        ("llama", "model.layers.0.mlp.gate_proj.weight", (97, 64)),  # row slices alone would not notice
        ("llama", "model.layers.1.mlp.down_proj.weight", (64, 100)),
        ("llama", "model.embed_tokens.weight", (VOCAB + 1, 64)),
    ],
)
def test_tensor_shape_not_matching_config(tiny_checkpoints, tmp_path, family, key, shape):
    directory = copy_checkpoint(tiny_checkpoints[family], tmp_path / family)
    state = load_file(directory / "model.safetensors")
    expected = tuple(state[key].shape)
    state[key] = torch.zeros(shape)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        load(directory, family)
    message = str(info.value)
    assert key in message and str(tuple(shape)) in message and str(expected) in message, message


@pytest.mark.parametrize(
    "family, key, pattern",
    [
        (
            "mixtral",
            "model.layers.1.self_attn.q_proj.weight",
            r"no tensor for model.layers.1.self_attn.q_proj",
        ),
        (
            "mixtral",
            "model.layers.0.block_sparse_moe.experts.2.w1.weight",
            r"no weights for expert 2 of layer 0",
        ),
        ("llama", "model.layers.1.mlp.up_proj.weight", r"no model.layers.1.mlp.up_proj.weight"),
        ("llama", "model.norm.weight", r"no tensor for model.norm.weight"),
    ],
)
def test_missing_tensor_is_an_error(tiny_checkpoints, tmp_path, family, key, pattern):
    directory = copy_checkpoint(tiny_checkpoints[family], tmp_path / family)
    state = load_file(directory / "model.safetensors")
    del state[key]
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=pattern):
        load(directory, family)


# ----------------------------------------------------------------------------------------- device
def test_cuda_without_cuda(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="allow_cpu_fallback=True") as info:
        load(tiny_checkpoints["mixtral"], device="cuda")
    assert isinstance(info.value, RuntimeError)


def test_cuda_fallback_to_cpu_warns_and_runs(tiny_checkpoints, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        model = load(tiny_checkpoints["mixtral"], device="cuda", allow_cpu_fallback=True)
    assert any("CUDA is not available" in r.getMessage() for r in caplog.records), caplog.text
    assert model.device.type == "cpu"
    ids = prompt()
    want = load(tiny_checkpoints["mixtral"]).generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)


# ---------------------------------------------------------------------------------------- context
def test_context_length_exceeded_fails_before_work_and_model_stays_usable(tiny_checkpoints):
    model = load(tiny_checkpoints["mixtral"], max_context=32)
    ids = prompt(length=16)
    want = model.generate(ids, max_new_tokens=8, do_sample=False)
    stats = model.hybrid.executor.stats
    groups = stats.groups
    with pytest.raises(ContextLengthError, match=r"needs 36 positions.*max_context=32") as info:
        model.generate(ids, max_new_tokens=20, do_sample=False)
    assert isinstance(info.value, ValueError)
    assert stats.groups == groups, "work was done before the context check"
    with pytest.raises(ContextLengthError, match="max_batch_size=1"):
        model.generate(prompt(batch=2), max_new_tokens=4, do_sample=False)
    assert stats.groups == groups
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), want)


# --------------------------------------------------------------------------------------- security
def test_trust_remote_code_defaults_to_false():
    # from_pretrained's options are HybridOptions' fields: their defaults are what a bare call gets
    from hf_hybrid.options import HybridOptions

    options, _ = HybridOptions.from_kwargs({})
    assert options.trust_remote_code is False
    assert options.allow_pickle is False


_EVIL_CODE = """import pathlib
pathlib.Path(__file__).with_name("REMOTE_CODE_RAN").write_text("yes")
from transformers import MixtralConfig, MixtralForCausalLM
class EvilConfig(MixtralConfig):
    model_type = "{model_type}"
class EvilForCausalLM(MixtralForCausalLM):
    config_class = EvilConfig
"""


@pytest.mark.parametrize("model_type", ["evil_moe", "mixtral"])
def test_auto_map_custom_code_is_never_executed(mixtral_copy, model_type):
    for module in ("configuration_evil", "modeling_evil"):
        (mixtral_copy / f"{module}.py").write_text(_EVIL_CODE.format(model_type=model_type))
    config = json.loads((mixtral_copy / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    (mixtral_copy / "config.json").write_text(json.dumps(config))
    if model_type == "mixtral":
        # a supported architecture loads with transformers' own code; the checkpoint's code is ignored
        from transformers import MixtralConfig, MixtralForCausalLM

        model = load(mixtral_copy)
        assert isinstance(model, MixtralForCausalLM) and type(model.config) is MixtralConfig
        assert not any("evil" in cls.__module__ for cls in type(model).__mro__)
    else:
        with pytest.raises(ValueError, match="evil_moe|trust_remote_code"):
            load(mixtral_copy)
    assert not (mixtral_copy / "REMOTE_CODE_RAN").exists()


def test_extra_kwargs_override_config_or_are_rejected(tiny_checkpoints, caplog):
    from hf_hybrid import HybridModelForCausalLM

    directory = tiny_checkpoints["mixtral"]
    options = dict(device="cpu", dtype=torch.float32, gpu_memory="256MiB", max_context=64, progress=False)
    model = HybridModelForCausalLM.from_pretrained(directory, output_router_logits=True, **options)
    assert model.config.output_router_logits is True  # a config attribute: overridden before the build
    model = HybridModelForCausalLM.from_pretrained(directory, device_map="auto", **options)
    assert model.hybrid_plan is not None  # a loading option hf_hybrid replaces: ignored (with a warning)
    with pytest.raises(TypeError, match="unexpected keyword"):
        HybridModelForCausalLM.from_pretrained(directory, gpu_memmory="1GiB", **options)


def test_unknown_dtype_string_is_named_in_the_error(tiny_checkpoints):
    with pytest.raises(TypeError, match=r"got 'bfloat'"):
        HybridModelForCausalLM.from_pretrained(tiny_checkpoints["mixtral"], device="cpu", dtype="bfloat")
