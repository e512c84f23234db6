"""peft LoRA on a hybrid model matches peft on plain transformers loading the same files.

The dense MLP's projections and the fused experts' parameters stay in the module tree (held by the
executor), so peft can target every projection: attention, gate/up/down of a dense MLP (``target_modules``)
and the experts' ``gate_up_proj`` / ``down_proj`` (``target_parameters``). The models run in float32 on
the CPU standing in, with homes forced onto every lane (row slices on the device, the CPU lane and
streamed). LoRA B is initialised randomly (peft's default zero B would add nothing, and the test could not fail).
"""

from __future__ import annotations

import pytest
import torch
from smollm2_markers import load_smollm2_pair, needs_smollm2
from tiny_models import VOCAB, load_every_lane
from transformers import AutoModelForCausalLM

import hf_hybrid.held
from hf_hybrid import HybridModelForCausalLM
from hf_hybrid.held import HeldLinear, HeldWeight, HeldWeightError

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
NEW_TOKENS = 6
# A dense MLP with an adapted projection runs transformers' forward on the assembled weights: the same bits
# as peft on transformers. Experts with an adapter run transformers' eager experts forward, while the
# reference model runs its default experts implementation (another kernel order); without an adapter
# the MoE layers sum their experts across lanes: a few fp32 ulps of logits near 10.
MOE_ATOL = 5e-6


def prompt(length: int = 10, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def lora(targets: list[str], parameters: list[str] | None = None, seed: int = 1) -> LoraConfig:
    """A LoRA config with random A and B (``init_lora_weights=False``)."""
    torch.manual_seed(seed)
    return LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets or None,
        target_parameters=parameters,
        init_lora_weights=False,
    )


def with_same_lora(ref, hybrid, config_of):
    """peft on both models, the hybrid one given the reference's adapter weights."""
    ref_peft = get_peft_model(ref, config_of())
    hybrid_peft = get_peft_model(hybrid, config_of())
    set_peft_model_state_dict(hybrid_peft, get_peft_model_state_dict(ref_peft))
    return ref_peft, hybrid_peft


def greedy(model, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def assert_same(ref, hybrid, ids: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """Logits within ``atol`` (default: the same bits) and the same greedy tokens; returns the reference
    logits."""
    with torch.no_grad():
        want, got = ref(ids).logits, hybrid(ids).logits
    assert torch.allclose(got, want, rtol=0, atol=atol), (got - want).abs().max()
    assert torch.equal(greedy(hybrid, ids), greedy(ref, ids))
    return want


def pair(tiny_checkpoints, family: str):
    """(plain transformers, hybrid on every lane) of a tiny checkpoint."""
    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[family], dtype=torch.float32)
    return ref, load_every_lane(tiny_checkpoints[family], family)


# ------------------------------------------------------------------------------------ module tree
@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2_moe"])
def test_the_module_tree_and_parameter_count_are_transformers(tiny_checkpoints, family):
    ref, hybrid = pair(tiny_checkpoints, family)
    try:
        shapes = {name: (tuple(p.shape), p.dtype) for name, p in ref.named_parameters()}
        assert {name: (tuple(p.shape), p.dtype) for name, p in hybrid.named_parameters()} == shapes
        for exclude in (False, True):
            assert hybrid.num_parameters(exclude_embeddings=exclude) == ref.num_parameters(
                exclude_embeddings=exclude
            )
        assert hybrid.dtype == torch.float32 and hybrid.device == torch.device("cpu")
        for layer, ref_layer in zip(hybrid.model.layers, ref.model.layers):
            experts = getattr(layer.mlp, "experts", None)
            if experts is None:
                for name in MLP:
                    module = getattr(layer.mlp, name)
                    assert isinstance(module, HeldLinear) and isinstance(module, torch.nn.Linear)
                    want = getattr(ref_layer.mlp, name).weight
                    assert (module.in_features, module.out_features) == (want.shape[1], want.shape[0])
                    # reading a held weight assembles it from the executor's homes: the checkpoint's values
                    assert torch.equal(module.weight.clone(), want)
                    assert module.weight.stride() == (0, 0)  # one element stored: no second copy
            else:
                for name in ("gate_up_proj", "down_proj"):
                    held, want = getattr(experts, name), getattr(ref_layer.mlp.experts, name)
                    assert isinstance(held, HeldWeight) and isinstance(held, torch.nn.Parameter)
                    assert torch.equal(held + 0, want) and torch.equal(held[1], want[1])
    finally:
        hybrid.hybrid.close()


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2_moe", "phimoe", "olmoe", "qwen3_moe"])
def test_without_adapters_nothing_reads_the_held_weights(tiny_checkpoints, family, monkeypatch):
    """The default path computes through the executor only: no forward or generate gathers a held weight."""
    ref, hybrid = pair(tiny_checkpoints, family)
    try:

        def refuse(*args, **kwargs):
            raise AssertionError("a held weight was gathered without an adapter")

        monkeypatch.setattr(hf_hybrid.held, "assemble_dense", refuse)
        monkeypatch.setattr(hf_hybrid.held, "assemble_experts", refuse)
        assert_same(ref, hybrid, prompt(), atol=MOE_ATOL)
    finally:
        hybrid.hybrid.close()


def test_held_weights_refuse_writes_and_the_model_stays_exact(tiny_checkpoints):
    ref, hybrid = pair(tiny_checkpoints, "qwen2_moe")  # a MoE layer and a dense one
    try:
        ids = prompt()
        want = assert_same(ref, hybrid, ids, atol=MOE_ATOL)
        held = [hybrid.model.layers[1].mlp.down_proj.weight, hybrid.model.layers[0].mlp.experts.gate_up_proj]
        for weight in held:
            for write in (
                lambda w: w.data.add_(1),
                lambda w: w.copy_(torch.zeros(w.shape)),
                lambda w: setattr(w, "data", torch.zeros(w.shape)),
            ):
                with pytest.raises(HeldWeightError, match="held by hf_hybrid's executor"):
                    write(weight)
        with pytest.raises(RuntimeError, match="held by hf_hybrid's executor"):
            hybrid.load_state_dict(ref.state_dict())
        with torch.no_grad():
            assert torch.allclose(hybrid(ids).logits, want, rtol=0, atol=MOE_ATOL)
    finally:
        hybrid.hybrid.close()


# ------------------------------------------------------------------------------------ dense MLPs
@pytest.mark.parametrize(
    "targets",
    [["gate_proj"], ["up_proj"], ["down_proj"], ATTENTION + MLP],
    ids=["gate", "up", "down", "all"],
)
def test_lora_on_dense_mlp_projections_matches_peft_on_transformers(tiny_checkpoints, targets):
    ref, hybrid = pair(tiny_checkpoints, "llama")
    try:
        ids = prompt()
        with torch.no_grad():
            base = hybrid(ids).logits
        ref_peft, hybrid_peft = with_same_lora(ref, hybrid, lambda: lora(targets))
        assert hybrid_peft.get_nb_trainable_parameters() == ref_peft.get_nb_trainable_parameters()
        groups = hybrid.hybrid.executor.stats.groups
        adapted = assert_same(ref_peft, hybrid_peft, ids)
        assert (adapted - base).abs().max() > 1e-2, "the adapter changes nothing: the test could not fail"
        # every MLP has an adapted projection: each computes its projections itself, none via the executor
        assert hybrid.hybrid.executor.stats.groups == groups
        with hybrid_peft.disable_adapter(), torch.no_grad():
            assert torch.equal(hybrid_peft(ids).logits, base)
        # unloading the adapter gives the MLPs back their executor path, with the same bits as before
        hybrid = hybrid_peft.unload()
        assert all(
            isinstance(getattr(layer.mlp, n), HeldLinear) for layer in hybrid.model.layers for n in MLP
        )
        groups = hybrid.hybrid.executor.stats.groups
        with torch.no_grad():
            assert torch.equal(hybrid(ids).logits, base)
        assert hybrid.hybrid.executor.stats.groups == groups + len(hybrid.model.layers)
    finally:
        hybrid.hybrid.close()


def test_lora_follows_the_weights_when_slices_merge_or_change_homes(tiny_checkpoints):
    """Every slice resident (held merged after the first forward), then one slice moved to the CPU lane, on
    the decode-graph path (uncaptured on the CPU): the adapter reads each weight where it is now."""
    directory = tiny_checkpoints["llama"]
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hybrid = HybridModelForCausalLM.from_pretrained(
        directory, device="cpu", dtype=torch.float32, max_context=64, decode_graphs=True, progress=False
    )
    try:
        ids = prompt(seed=7)
        with torch.no_grad():
            hybrid(ids)
        group = next(iter(hybrid.hybrid.loaded.groups.values()))
        assert group.merged is not None
        ref_peft, hybrid_peft = with_same_lora(ref, hybrid, lambda: lora(MLP))
        assert_same(ref_peft, hybrid_peft, ids)
        hybrid.hybrid.executor.rehome(group, 0, "cpu")
        assert group.merged is None
        assert_same(ref_peft, hybrid_peft, ids)
        assert torch.equal(
            hybrid.model.layers[0].mlp.down_proj.weight.clone(), ref.model.layers[0].mlp.down_proj.weight
        )
    finally:
        hybrid.hybrid.close()


def test_switching_adapters_and_refusing_a_merge(tiny_checkpoints):
    ref, hybrid = pair(tiny_checkpoints, "qwen2")
    try:
        ids = prompt(seed=3)
        ref_peft, hybrid_peft = with_same_lora(ref, hybrid, lambda: lora(MLP))
        for model, seed in ((ref_peft, 2), (hybrid_peft, 2)):
            model.add_adapter("second", lora(["up_proj", "v_proj"], seed=seed))
        second = get_peft_model_state_dict(ref_peft, adapter_name="second")
        set_peft_model_state_dict(hybrid_peft, second, adapter_name="second")
        for name in ("second", "default"):
            ref_peft.set_adapter(name)
            hybrid_peft.set_adapter(name)
            assert_same(ref_peft, hybrid_peft, ids)
        with pytest.raises(HeldWeightError, match="LoRA merge"):
            hybrid_peft.merge_and_unload()
        with pytest.raises(HeldWeightError, match="LoRA merge"):
            hybrid_peft.merge_adapter()
        # nothing was folded in: the adapter still adds its delta as peft on transformers does
        assert_same(ref_peft, hybrid_peft, ids)
    finally:
        hybrid.hybrid.close()


# ------------------------------------------------------------------------------------ MoE experts
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("parameters", [EXPERTS, ["experts.gate_up_proj"]], ids=["both", "gate_up"])
def test_lora_on_experts_parameters_matches_peft_on_transformers(tiny_checkpoints, family, parameters):
    ref, hybrid = pair(tiny_checkpoints, family)
    try:
        ids = prompt(seed=5)
        with torch.no_grad():
            base = hybrid(ids).logits
        targets = ["q_proj"] + (MLP if family == "qwen2_moe" else [])  # qwen2_moe's layer 1 is dense
        ref_peft, hybrid_peft = with_same_lora(ref, hybrid, lambda: lora(targets, parameters))
        adapted = assert_same(ref_peft, hybrid_peft, ids, atol=MOE_ATOL)
        assert (adapted - base).abs().max() > 1e-2
        with hybrid_peft.disable_adapter(), torch.no_grad():
            assert torch.equal(hybrid_peft(ids).logits, base)
        with pytest.raises(HeldWeightError, match="experts"):
            hybrid_peft.merge_and_unload()
    finally:
        hybrid.hybrid.close()


# ------------------------------------------------------------------------------------ SmolLM2
@needs_smollm2
def test_lora_on_every_projection_of_smollm2_matches_peft_on_transformers():
    tokenizer, ref, hybrid = load_smollm2_pair(token_assignment="static")
    try:
        assert hybrid.num_parameters() == ref.num_parameters()
        ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
        with torch.no_grad():
            base = hybrid(ids).logits
        ref_peft, hybrid_peft = with_same_lora(ref, hybrid, lambda: lora(ATTENTION + MLP))
        adapted = assert_same(ref_peft, hybrid_peft, ids)
        assert (adapted - base).abs().max() > 1e-1
    finally:
        hybrid.hybrid.close()
