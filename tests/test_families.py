"""A family hf_hybrid has never seen runs exactly once its FamilyAdapter is written and registered.

"ToyMoE" is Mixtral with another layout: in the module tree the MoE block of a decoder layer is ``moe``
(not ``mlp``), and the checkpoint names its router ``moe.router`` and its experts
``moe.ffn.<e>.{wi,wu,wo}`` (not ``block_sparse_moe.gate`` / ``block_sparse_moe.experts.<e>.{w1,w3,w2}``).
Nothing in hf_hybrid is changed for it: the adapter below is all it gets.
"""

from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_exactness import prompt
from tiny_models import MOE_PLACEMENT
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer

from hf_hybrid import CheckpointError, HybridModelForCausalLM, UnsupportedModelError
from hf_hybrid.families import FAMILIES, MIXTRAL, FamilyAdapter, for_config, register


# ------------------------------------------------------------------------------ the transformers side
class ToyMoeConfig(MixtralConfig):
    model_type = "toy_moe"


class ToyMoeDecoderLayer(MixtralDecoderLayer):
    """Mixtral's decoder layer with its MoE block registered as ``moe``."""

    @property
    def mlp(self):  # the inherited forward calls self.mlp
        return self.moe


class ToyMoeForCausalLM(MixtralForCausalLM):
    config_class = ToyMoeConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.__class__ = ToyMoeDecoderLayer
            layer.moe = layer._modules.pop("mlp")


AutoConfig.register("toy_moe", ToyMoeConfig, exist_ok=True)
AutoModelForCausalLM.register(ToyMoeConfig, ToyMoeForCausalLM, exist_ok=True)


# ------------------------------------------------------------------------------ the hf_hybrid side
class ToyMoeAdapter(FamilyAdapter):
    """ToyMoE: the MoE block is ``moe``; the checkpoint calls its router ``moe.router`` and stores expert
    ``e`` as ``moe.ffn.<e>.wi`` (gate), ``.wu`` (up), ``.wo`` (down)."""

    def to_model_key(self, checkpoint_key: str) -> str:
        """``moe.router`` is ``moe.gate`` in the module tree."""
        return checkpoint_key.replace(".moe.router.", ".moe.gate.")

    def expert_weight_keys(self, index: int, expert: int) -> tuple[str, str, str]:
        """``model.layers.<i>.moe.ffn.<e>.{wi,wu,wo}.weight``."""
        return tuple(f"{self.layer_key(index)}.moe.ffn.{expert}.{role}.weight" for role in ("wi", "wu", "wo"))


TOY_MOE = ToyMoeAdapter("ToyMoE", ("toy_moe",), mlp_name="moe")

_TOY_KEYS = (
    (re.compile(r"\.block_sparse_moe\.gate\."), ".moe.router."),
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w1\."), r".moe.ffn.\1.wi."),
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w3\."), r".moe.ffn.\1.wu."),
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w2\."), r".moe.ffn.\1.wo."),
)


def _toy_key(key: str) -> str:
    for pattern, replacement in _TOY_KEYS:
        key = pattern.sub(replacement, key)
    return key


@pytest.fixture(scope="module")
def toy_checkpoint(tiny_checkpoints, tmp_path_factory):
    """The tiny Mixtral checkpoint rewritten as a ToyMoE one (same tensors, ToyMoE names)."""
    source = tiny_checkpoints["mixtral"]
    directory = tmp_path_factory.mktemp("toy_moe")
    state = load_file(source / "model.safetensors")
    renamed = {_toy_key(k): v for k, v in state.items()}
    assert any(".moe.ffn.3.wo." in k for k in renamed) and not any("block_sparse_moe" in k for k in renamed)
    save_file(renamed, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config.update(model_type="toy_moe", architectures=["ToyMoeForCausalLM"])
    (directory / "config.json").write_text(json.dumps(config))
    if (source / "generation_config.json").is_file():
        shutil.copy(source / "generation_config.json", directory)
    return directory


def _load_toy(directory, **options):
    return HybridModelForCausalLM.from_pretrained(
        directory, device="cpu", dtype=torch.float32, max_context=64, progress=False, **options
    )


@pytest.mark.parametrize(
    "options",
    [
        {
            "gpu_memory": "256MiB",
            "placement": MOE_PLACEMENT,
            "token_assignment": "static",
            "max_batch_size": 2,
        },
        {"gpu_memory": "16.9MiB", "max_batch_size": 1},
    ],
    ids=["every-home", "small-budget"],
)
def test_registered_family_matches_transformers(tiny_checkpoints, toy_checkpoint, options):
    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["mixtral"], dtype=torch.float32)
    with register(TOY_MOE):
        hybrid = _load_toy(toy_checkpoint, **options)
    assert isinstance(hybrid, ToyMoeForCausalLM)
    plan = hybrid.hybrid_plan
    assert len(plan.units_in("gpu")) > 0 and len(plan.units_in("cpu")) + len(plan.units_in("stream")) > 0
    if "placement" in options:
        assert set(plan.homes.values()) == {"gpu", "cpu", "stream"}
    assert {u.name for u in plan.units if u.kind == "router"} == {"layers.0.router", "layers.1.router"}
    assert sum(u.kind == "expert" for u in plan.units) == 8
    ids = prompt(batch=options["max_batch_size"])
    with torch.no_grad():
        expected = ref(ids).logits
        got = hybrid(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=5e-6)
    stats = hybrid.hybrid.executor.stats
    assert stats.gpu_units > 0 and stats.cpu_units + stats.streamed_units > 0, stats
    want = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(hybrid.generate(ids, max_new_tokens=12, do_sample=False), want)


def test_the_adapter_is_what_finds_the_weights(toy_checkpoint):
    # unknown until registered: refused before any weight is read
    with pytest.raises(UnsupportedModelError, match="model_type='toy_moe'"):
        _load_toy(toy_checkpoint, gpu_memory="16.9MiB")

    # everything but the adapter's expert names: the experts are not found
    class WithoutExpertNames(ToyMoeAdapter):
        expert_weight_keys = FamilyAdapter.expert_weight_keys

    with register(WithoutExpertNames("ToyMoE without expert names", ("toy_moe",), mlp_name="moe")):
        with pytest.raises(CheckpointError, match="expert 0 of layer 0"):
            _load_toy(toy_checkpoint, gpu_memory="16.9MiB")


def test_unknown_model_type_lists_the_families():
    unknown = SimpleNamespace(model_type="nope", architectures=["NopeForCausalLM"])
    with pytest.raises(UnsupportedModelError, match=r"model_type='nope'.*NopeForCausalLM") as info:
        for_config(unknown)
    message = str(info.value)
    for family in FAMILIES:
        assert family.name in message
        assert all(t in message for t in family.model_types)
    assert "ToyMoE" not in message
    with register(TOY_MOE):
        with pytest.raises(UnsupportedModelError) as info:
            for_config(unknown)
        assert "ToyMoE (toy_moe)" in str(info.value) and "Mixtral (mixtral)" in str(info.value)


def test_register_is_undone():
    toy = SimpleNamespace(model_type="toy_moe")
    registration = register(TOY_MOE)
    try:
        assert for_config(toy) is TOY_MOE
    finally:
        registration.remove()
    registration.remove()  # idempotent
    with pytest.raises(UnsupportedModelError):
        for_config(toy)
    # a registered adapter comes before the built-in one for the same model_type
    other = FamilyAdapter("Mixtral, renamed", ("mixtral",))
    with register(other) as adapter:
        assert adapter is other and for_config(SimpleNamespace(model_type="mixtral")) is other
    assert for_config(SimpleNamespace(model_type="mixtral")) is MIXTRAL
    with pytest.raises(TypeError):
        register("mixtral")
