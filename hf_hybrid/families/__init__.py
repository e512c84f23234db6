"""Per-family knowledge: which architectures are supported, where their parts live, how checkpoints name them.

A :class:`FamilyAdapter` is the one place that knows a family's model structure: where the decoder layers,
attention, MoE block, router, experts, shared expert and dense MLP are in the transformers module tree, which
unit a parameter belongs to, and what the checkpoint calls each tensor. Units, loading, the hooks and the
bench ask the adapter instead of walking attribute names themselves.

The default methods describe the transformers 5.x layout that every built-in family shares::

    model.model.embed_tokens / .layers[i] / .norm, model.lm_head
    layers[i].self_attn
    layers[i].mlp                    MoE block, or a dense gated MLP (gate_proj / up_proj / down_proj)
    layers[i].mlp.gate | .router     router of a MoE block
    layers[i].mlp.experts            fused experts: gate_up_proj [E, 2I, H], down_proj [E, H, I], act_fn
    layers[i].mlp.shared_expert      optional

Built-in families differ only in data (checkpoint names of expert weights, renames). A family with another
layout sets ``attention_name`` / ``mlp_name`` where only those attribute names differ, or subclasses
:class:`FamilyAdapter` and overrides the methods that differ (``layer_key``, ``unit_of_param`` and the
``*_weight_keys`` methods spell out ``model.layers.<i>`` paths); :func:`register` makes it known.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import UnsupportedModelError

_LAYER_PARAM = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class FamilyAdapter:
    """The model structure and checkpoint naming of one family of architectures.

    ``model_types`` are the ``config.model_type`` values it serves. ``expert_names`` are the checkpoint names
    of one expert's (gate, up, down) matrices under ``<moe block>.experts.<e>.``; ``checkpoint_renames`` map
    checkpoint key substrings to the module-tree names transformers uses (e.g. Mixtral's
    ``block_sparse_moe`` became ``mlp`` in 5.x), applied in order by :meth:`to_model_key`.
    ``attention_name`` and ``mlp_name`` are the attribute names of a decoder layer's attention and
    feed-forward blocks in the module tree.

    Methods taking ``layer`` take one decoder layer module (an item of :meth:`layers`); methods taking
    ``index`` take its position. Key-returning methods give names as :meth:`to_model_key` leaves them: the
    loader finds a checkpoint tensor by mapping every checkpoint name through :meth:`to_model_key`.
    """

    name: str
    model_types: tuple[str, ...]
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    attention_name: str = "self_attn"
    mlp_name: str = "mlp"

    # ------------------------------------------------------------------------------ checkpoint names
    def to_model_key(self, checkpoint_key: str) -> str:
        """Map a checkpoint tensor name to the module-tree parameter name."""
        for old, new in self.checkpoint_renames:
            checkpoint_key = checkpoint_key.replace(old, new)
        return checkpoint_key

    def layer_key(self, index: int) -> str:
        """The module-tree path of decoder layer ``index`` (``model.layers.3``)."""
        return f"model.layers.{index}"

    def expert_weight_keys(self, index: int, expert: int) -> tuple[str, str, str]:
        """Names of one expert's (gate [I, H], up [I, H], down [H, I]) matrices in a checkpoint that stores
        experts one by one, as :meth:`to_model_key` maps them."""
        prefix = f"{self.layer_key(index)}.{self.mlp_name}.experts.{expert}."
        return tuple(f"{prefix}{role}.weight" for role in self.expert_names)

    def fused_expert_weight_keys(self, index: int) -> tuple[str, str]:
        """Names of layer ``index``'s (gate_up [E, 2I, H], down [E, H, I]) tensors in a checkpoint that
        stores all experts of a layer fused, as :meth:`to_model_key` maps them."""
        prefix = f"{self.layer_key(index)}.{self.mlp_name}.experts."
        return prefix + "gate_up_proj", prefix + "down_proj"

    def dense_mlp_weight_keys(self, index: int) -> tuple[str, str, str]:
        """Names of layer ``index``'s dense MLP (gate [I, H], up [I, H], down [H, I]) weights, as
        :meth:`to_model_key` maps them."""
        prefix = f"{self.layer_key(index)}.{self.mlp_name}."
        return tuple(f"{prefix}{role}.weight" for role in ("gate_proj", "up_proj", "down_proj"))

    def unit_of_param(self, name: str, moe_layers: set[int]) -> str | None:
        """The unit a module-tree parameter belongs to (None for expert / MLP-slice weights, which are
        loaded per layer group). ``moe_layers`` are the indices of the layers that have experts."""
        if name.startswith("model.embed_tokens."):
            return "embed_tokens"
        if name.startswith("lm_head."):
            return "lm_head"
        if name.startswith("model.norm."):
            return "norm"
        m = _LAYER_PARAM.match(name)
        if not m:
            return None
        i, rest = int(m.group(1)), m.group(2)
        if rest.startswith(self.attention_name + "."):
            return f"layers.{i}.attention"
        if rest.startswith(self.mlp_name + "."):
            sub = rest[len(self.mlp_name) + 1 :]
            if i in moe_layers:
                if sub.startswith("experts."):
                    return None
                if sub.startswith("shared_expert."):
                    return f"layers.{i}.shared_expert"
                return f"layers.{i}.router"  # the router and anything else small in the MoE block
            return None  # dense MLP weights: loaded as row slices
        return f"layers.{i}.norms"

    # ------------------------------------------------------------------------------ module tree
    def decoder(self, model: torch.nn.Module) -> torch.nn.Module:
        """The decoder stack of a causal LM (``model.model``)."""
        return model.get_decoder() if hasattr(model, "get_decoder") else model.model

    def layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The decoder layers, in order."""
        return list(self.decoder(model).layers)

    def embeddings(self, model: torch.nn.Module) -> torch.nn.Module:
        """The input token embedding."""
        return model.get_input_embeddings()

    def rotary(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The decoder's rotary embedding module (``rotary(x, position_ids) -> (cos, sin)``), or None."""
        return getattr(self.decoder(model), "rotary_emb", None)

    def final_norm(self, model: torch.nn.Module) -> torch.nn.Module:
        """The norm after the last decoder layer."""
        return self.decoder(model).norm

    def attention(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The attention block of a layer (its output projection is ``o_proj``)."""
        return getattr(layer, self.attention_name)

    def mlp(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The feed-forward block of a layer: a MoE block, or a dense gated MLP."""
        return getattr(layer, self.mlp_name)

    def experts(self, layer: torch.nn.Module) -> torch.nn.Module | None:
        """The fused experts module of a MoE layer (``gate_up_proj``, ``down_proj``, ``act_fn``); None for
        a dense layer."""
        return getattr(self.mlp(layer), "experts", None)

    def is_moe_layer(self, layer: torch.nn.Module) -> bool:
        """Whether the layer routes tokens to experts."""
        return self.experts(layer) is not None

    def moe_layers(self, model: torch.nn.Module) -> set[int]:
        """Indices of the layers that have experts."""
        return {i for i, layer in enumerate(self.layers(model)) if self.is_moe_layer(layer)}

    def router(self, layer: torch.nn.Module) -> torch.nn.Module | None:
        """The router of a MoE layer (a module with a 2-D ``weight`` [experts, hidden]: ``mlp.gate`` in
        Mixtral / Qwen / OLMoE, ``mlp.router`` in PhiMoE); None for a dense layer."""
        if not self.is_moe_layer(layer):
            return None
        mlp = self.mlp(layer)
        for name in ("gate", "router"):
            weight = getattr(getattr(mlp, name, None), "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                return getattr(mlp, name)
        return None

    def shared_expert(self, layer: torch.nn.Module) -> torch.nn.Module | None:
        """The shared expert every token of a MoE layer goes through (Qwen2-MoE), else None."""
        if not self.is_moe_layer(layer):
            return None
        return getattr(self.mlp(layer), "shared_expert", None)

    def expert_shapes(self, layer: torch.nn.Module) -> tuple[int, int, int]:
        """(num_experts, intermediate, hidden) of a MoE layer."""
        num_experts, two_inter, hidden = self.experts(layer).gate_up_proj.shape
        return num_experts, two_inter // 2, hidden

    def dense_mlp_projections(
        self, layer: torch.nn.Module
    ) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        """The (gate, up, down) linear modules of a dense layer's MLP."""
        mlp = self.mlp(layer)
        return mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def mlp_activation(self, layer: torch.nn.Module):
        """The activation between gate and up of the layer's experts (MoE) or of its dense MLP."""
        experts = self.experts(layer)
        return experts.act_fn if experts is not None else self.mlp(layer).act_fn


MIXTRAL = FamilyAdapter("Mixtral", ("mixtral",), ("w1", "w3", "w2"), ((".block_sparse_moe.", ".mlp."),))
PHIMOE = FamilyAdapter(
    "PhiMoE",
    ("phimoe",),
    ("w1", "w3", "w2"),
    ((".block_sparse_moe.gate.", ".mlp.router."), (".block_sparse_moe.", ".mlp.")),
)
QWEN2_MOE = FamilyAdapter("Qwen2-MoE", ("qwen2_moe",))
QWEN3_MOE = FamilyAdapter("Qwen3-MoE", ("qwen3_moe",))
OLMOE = FamilyAdapter("OLMoE", ("olmoe",))
DENSE = FamilyAdapter("Llama / Mistral / Qwen2 (dense)", ("llama", "mistral", "qwen2"))

#: The built-in families.
FAMILIES: tuple[FamilyAdapter, ...] = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, PHIMOE, OLMOE, DENSE)

_registered: list[FamilyAdapter] = []


class Registration:
    """A family made known by :func:`register`; ``remove()`` (or leaving a ``with`` block) forgets it."""

    def __init__(self, adapter: FamilyAdapter):
        self.adapter = adapter

    def remove(self) -> None:
        """Forget the family (idempotent)."""
        for n, adapter in enumerate(_registered):
            if adapter is self.adapter:
                del _registered[n]
                return

    def __enter__(self) -> FamilyAdapter:
        return self.adapter

    def __exit__(self, *exc) -> None:
        self.remove()


def register(adapter: FamilyAdapter) -> Registration:
    """Make :func:`for_config` answer ``adapter`` for its ``model_types``, ahead of the built-in families.

    Takes effect at once; use the result as a context manager (``with register(adapter): ...``) or call its
    ``remove()`` to forget the family again. The transformers model and config classes of a new
    ``model_type`` are registered with transformers as usual (``AutoConfig.register`` ...).
    """
    if not isinstance(adapter, FamilyAdapter):
        raise TypeError(f"register() takes a FamilyAdapter, not {type(adapter).__name__}")
    _registered.insert(0, adapter)
    return Registration(adapter)


def known_families() -> tuple[FamilyAdapter, ...]:
    """Registered families (latest first), then the built-in ones: the order :func:`for_config` tries."""
    return (*_registered, *FAMILIES)


def supported_model_types() -> list[str]:
    """All ``config.model_type`` values hf_hybrid can run."""
    return list(dict.fromkeys(t for family in known_families() for t in family.model_types))


def for_config(config) -> FamilyAdapter:
    """The adapter for ``config``; raises :class:`UnsupportedModelError` listing what is supported."""
    model_type = getattr(config, "model_type", None)
    families = known_families()
    for family in families:
        if model_type in family.model_types:
            return family
    names = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in families)
    raise UnsupportedModelError(
        f"hf_hybrid does not support model_type={model_type!r} "
        f"(architectures: {getattr(config, 'architectures', None)}). Supported families: {names}."
    )
