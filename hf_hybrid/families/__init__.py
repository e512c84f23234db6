"""Per-family knowledge: which architectures are supported and how their checkpoints name things.

Everything structural (where attention, the router, the experts and the MLP live) is read off the
transformers module tree itself (see :mod:`hf_hybrid.units`); an adapter only says what the module tree
cannot: the checkpoint's names for expert weights and the renames transformers applies when loading.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class FamilyAdapter:
    """What differs between supported families.

    ``expert_names`` are the checkpoint names of one expert's (gate, up, down) matrices under
    ``<moe prefix>.experts.<e>.``; ``checkpoint_renames`` map checkpoint key substrings to the
    module-tree names transformers uses (e.g. Mixtral's ``block_sparse_moe`` became ``mlp`` in 5.x).
    """

    name: str
    model_types: tuple[str, ...]
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    is_moe: bool = True

    def to_model_key(self, checkpoint_key: str) -> str:
        """Map a checkpoint tensor name to the module-tree parameter name."""
        for old, new in self.checkpoint_renames:
            checkpoint_key = checkpoint_key.replace(old, new)
        return checkpoint_key


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
DENSE = FamilyAdapter("Llama / Mistral / Qwen2 (dense)", ("llama", "mistral", "qwen2"), is_moe=False)

FAMILIES: tuple[FamilyAdapter, ...] = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, PHIMOE, OLMOE, DENSE)


def supported_model_types() -> list[str]:
    """All ``config.model_type`` values hf_hybrid can run."""
    return [t for family in FAMILIES for t in family.model_types]


def for_config(config) -> FamilyAdapter:
    """The adapter for ``config``; raises :class:`UnsupportedModelError` listing what is supported."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    names = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise UnsupportedModelError(
        f"hf_hybrid does not support model_type={model_type!r} "
        f"(architectures: {getattr(config, 'architectures', None)}). Supported families: {names}."
    )
