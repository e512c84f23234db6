"""From a checkpoint to a model whose weights sit in their homes, one tensor at a time.

The model skeleton is built on the meta device (no memory); each tensor is then read from its
safetensors shard (memory-mapped) straight into its home: the device for resident units, a pinned host
arena for everything the executor may stream or compute on the CPU. The host never holds two copies of
the model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError, HostMemoryError, WeightsNotFoundError
from .families import FamilyAdapter
from .planner import HybridPlan
from .system import meminfo
from .units import CPU, GPU, STREAM, Unit, format_bytes
from .weights import ExpertGroup, HostArena, can_pin, carve, layout_bytes

WEIGHT_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.model",
    "*.txt",
    "*.jinja",
    "*.py",
]


# ------------------------------------------------------------------------------------ finding weights
#: Pickle shards hf_hybrid reads with ``allow_pickle=True`` (``training_args.bin`` and the like are not weights).
PICKLE_PATTERNS = ["pytorch_model*.bin", "model*.bin", "pytorch_model*.bin.index.json"]
PICKLE_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"

# Directories :func:`resolve_checkpoint` was told ``allow_pickle=True`` for: a :class:`CheckpointReader` made
# without an explicit ``allow_pickle`` reads pickle shards only there.
_PICKLE_ALLOWED: set[Path] = set()


def resolve_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """A local directory holding the weights of ``name_or_path`` (downloaded if a hub id).

    Checks, before anything is planned or read: the directory has a readable config.json of a supported
    architecture (:class:`UnsupportedModelError` otherwise, listing the supported families), it holds
    safetensors shards (or, only with ``allow_pickle=True``, ``pytorch_model*.bin`` shards), and every shard a
    ``*.index.json`` names is present.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        directory = path
    elif path.exists():
        raise WeightsNotFoundError(
            f"{path} is a file; pass the directory that holds config.json and the shards"
        )
    elif looks_like_path(str(name_or_path)):
        raise WeightsNotFoundError(
            f"no such directory: {path}. Pass a local checkpoint directory or a Hugging Face hub id like "
            f"'mistralai/Mixtral-8x7B-v0.1'."
        )
    else:
        directory = _download(str(name_or_path), revision, token, cache_dir, local_files_only, allow_pickle)
    check_config(directory)
    if safetensors_shards(directory):
        _check_index(directory, SAFETENSORS_INDEX)
        return directory
    pickled = pickle_shards(directory)
    if not pickled:
        others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {', '.join(others[:3])}, which hf_hybrid cannot read)" if others else ""
        raise WeightsNotFoundError(
            f"{directory} has config.json but no weights{hint}: hf_hybrid needs the *.safetensors shards (with "
            f"{SAFETENSORS_INDEX} when sharded). Download the weights into that directory, or pass the "
            f"directory that holds them (a checkpoint published only as pytorch_model*.bin needs "
            f"allow_pickle=True)."
        )
    if not allow_pickle:
        raise WeightsNotFoundError(
            f"{directory} holds only pickle checkpoints ({', '.join(p.name for p in pickled[:3])}); hf_hybrid "
            f"reads safetensors and refuses pickle files by default. Convert them (transformers: load then "
            f"save_pretrained(safe_serialization=True)), or pass allow_pickle=True to load them with "
            f"torch.load(weights_only=True)."
        )
    _check_index(directory, PICKLE_INDEX)
    _PICKLE_ALLOWED.add(directory.resolve())
    return directory


def safetensors_shards(directory: Path) -> list[Path]:
    """The ``*.safetensors`` files of ``directory``, sorted."""
    return sorted(directory.glob("*.safetensors"))


def pickle_shards(directory: Path) -> list[Path]:
    """The pickle weight shards of ``directory``: those its ``pytorch_model.bin.index.json`` names, else
    ``pytorch_model*.bin`` / ``model*.bin``."""
    index = directory / PICKLE_INDEX
    if index.is_file():
        return [directory / name for name in sorted(set(_read_index(index).values()))]
    found: set[Path] = set()
    for pattern in ("pytorch_model*.bin", "model*.bin"):
        found.update(directory.glob(pattern))
    return sorted(found)


def _read_index(index: Path) -> dict[str, str]:
    try:
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"cannot read {index.name} ({exc!r}): it should be JSON with a 'weight_map' of tensor name -> shard "
            f"file. Download it again."
        ) from exc
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index.name}: 'weight_map' is not a mapping of tensor name -> shard file")
    return weight_map


def _check_index(directory: Path, index_name: str) -> None:
    index = directory / index_name
    if not index.is_file():
        return
    missing = sorted({name for name in _read_index(index).values() if not (directory / name).is_file()})
    if missing:
        raise CheckpointError(
            f"{index_name} in {directory} names {len(missing)} shard(s) that are not there "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): the download is incomplete. "
            f"Download the missing shards."
        )


def check_config(directory: Path) -> dict:
    """The raw config.json of ``directory``, checked to be readable and of a supported architecture.

    Runs before transformers sees the config, so an unsupported or custom-code model is refused without
    importing anything from the checkpoint.
    """
    from types import SimpleNamespace

    from .families import for_config

    config_path = directory / "config.json"
    if not config_path.is_file():
        raise WeightsNotFoundError(
            f"{directory} has no config.json: pass the directory of a transformers checkpoint (config.json and "
            f"*.safetensors shards) or a hub id."
        )
    try:
        with open(config_path) as fh:
            raw = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {config_path}: {exc}. Download it again.") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path} is not a JSON object")
    if "model_type" in raw:
        for_config(SimpleNamespace(model_type=raw["model_type"], architectures=raw.get("architectures")))
    return raw


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path: hub ids are ``name`` or ``owner/name``, never more."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or not name.strip()


def hub_offline() -> bool:
    """Whether the environment forbids hub traffic *now* (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``).

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import; reading it here too honours a variable set
    afterwards, so an offline run never waits on network retries.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return False


def _download(repo_id, revision, token, cache_dir, local_files_only, allow_pickle=False) -> Path:
    """Fetch config.json first (an unsupported architecture is refused before any weight is downloaded),
    then the safetensors shards; pickle shards only when there are none and ``allow_pickle``."""
    if local_files_only:
        offline = "local_files_only=True"
    elif hub_offline():
        offline = "HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set"
    else:
        offline = None

    directory = _snapshot(repo_id, revision, token, cache_dir, offline, ["config.json"])
    check_config(directory)
    directory = _snapshot(repo_id, revision, token, cache_dir, offline, WEIGHT_PATTERNS)
    if not safetensors_shards(directory) and allow_pickle:
        directory = _snapshot(
            repo_id, revision, token, cache_dir, offline, [*WEIGHT_PATTERNS, *PICKLE_PATTERNS]
        )
    return directory


def _snapshot(repo_id, revision, token, cache_dir, offline: str | None, patterns: list[str]) -> Path:
    """``snapshot_download`` with its errors turned into :class:`WeightsNotFoundError` saying what to do.

    ``offline`` is why hub traffic is off (None when it is allowed).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=offline is not None,
                allow_patterns=patterns,
            )
        )
    except HFValidationError as exc:
        raise WeightsNotFoundError(
            f"{repo_id!r} is neither a local directory nor a valid Hugging Face hub id ('owner/name'): {exc}"
        ) from exc
    except GatedRepoError as exc:
        raise WeightsNotFoundError(
            f"{repo_id!r} is a gated model: accept its terms on https://huggingface.co/{repo_id} and pass "
            f"token= (or log in with `hf auth login`)."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise WeightsNotFoundError(
            f"{repo_id!r} is neither a local directory nor a model on the Hugging Face hub (check the name, or "
            f"pass token= for a gated/private model)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise WeightsNotFoundError(
            f"{repo_id!r} has no revision {revision!r}: pass an existing branch, tag or commit."
        ) from exc
    except LocalEntryNotFoundError as exc:
        if offline is not None:
            raise WeightsNotFoundError(
                f"{repo_id!r} is not a local directory and is not in the Hugging Face cache, and hub downloads "
                f"are off ({offline}). Check the name, download it once while online, or pass a local "
                f"directory."
            ) from exc
        raise WeightsNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face hub and it is not in the local cache: {exc}. "
            f"Check the network, or pass a local directory."
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise WeightsNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face hub and it is not in the local cache: {exc}. "
            f"Check the network, or pass a local directory."
        ) from exc


class CheckpointReader:
    """Lazy, memory-mapped access to every tensor of a checkpoint by name.

    Reads the ``*.safetensors`` shards of ``directory``. A directory with only pickle shards
    (``pytorch_model*.bin``) gives a :class:`PickleCheckpointReader` instead, with the same interface, when
    pickle is allowed: ``allow_pickle=True``, or ``None`` (the default) where :func:`resolve_checkpoint` was
    called with ``allow_pickle=True`` for that directory. Otherwise it is refused.
    """

    def __new__(cls, directory: Path, allow_pickle: bool | None = None):
        directory = Path(directory)
        if cls is CheckpointReader and not safetensors_shards(directory) and pickle_shards(directory):
            allowed = directory.resolve() in _PICKLE_ALLOWED if allow_pickle is None else bool(allow_pickle)
            if not allowed:
                raise WeightsNotFoundError(
                    f"{directory} holds only pickle checkpoints; pass allow_pickle=True to load them with "
                    f"torch.load(weights_only=True), or convert them to safetensors."
                )
            cls = PickleCheckpointReader
        return super().__new__(cls)

    def __init__(self, directory: Path, allow_pickle: bool | None = None):
        self.directory = Path(directory)
        self.key_to_file: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        shards = safetensors_shards(self.directory)
        if not shards:
            raise WeightsNotFoundError(f"{self.directory} contains no *.safetensors weights")
        for shard in shards:
            try:
                handle = safe_open(str(shard), framework="pt", device="cpu")
                keys = list(handle.keys())
            except Exception as exc:  # safetensors raises its own error types for truncated headers
                raise CheckpointError(
                    f"cannot read {shard.name}: {exc}. The file is truncated or corrupt: download it again."
                ) from exc
            self._handles[shard] = handle
            for key in keys:
                self.key_to_file[key] = shard

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def keys(self):
        """All tensor names."""
        return self.key_to_file.keys()

    def get(
        self, key: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The tensor ``key`` (or a row / column range of it), read from the mapped file."""
        handle = self._handles[self.key_to_file[key]]
        try:
            if rows is None and cols is None:
                return handle.get_tensor(key)
            piece = handle.get_slice(key)
            r = slice(*rows) if rows else slice(None)
            c = slice(*cols) if cols else slice(None)
            return piece[r, c]
        except Exception as exc:
            raise CheckpointError(
                f"cannot read tensor {key} from {self.key_to_file[key].name}: {exc}. The shard is corrupt or "
                f"truncated: download it again."
            ) from exc

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` without reading it."""
        return tuple(self._handles[self.key_to_file[key]].get_slice(key).get_shape())


class PickleCheckpointReader(CheckpointReader):
    """:class:`CheckpointReader` over ``pytorch_model*.bin`` shards (sharded with
    ``pytorch_model.bin.index.json`` or not).

    Each shard is opened with ``torch.load(map_location="cpu", weights_only=True, mmap=True)``: the restricted
    unpickler that only rebuilds tensors (no arbitrary code), and tensors backed by the mapped file, so
    nothing is read until it is used.
    """

    def __init__(self, directory: Path, allow_pickle: bool | None = None):
        self.directory = Path(directory)
        self.key_to_file = {}
        self._tensors: dict[str, torch.Tensor] = {}
        shards = pickle_shards(self.directory)
        if not shards:
            raise WeightsNotFoundError(f"{self.directory} contains no pytorch_model*.bin weights")
        for shard in shards:
            for key, value in _torch_load(shard).items():
                self._tensors[key] = value
                self.key_to_file[key] = shard

    def get(
        self, key: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The tensor ``key`` (or a row / column range of it), backed by the mapped file."""
        tensor = self._tensors[key]
        if rows is None and cols is None:
            return tensor
        r = slice(*rows) if rows else slice(None)
        c = slice(*cols) if cols else slice(None)
        return tensor[r, c]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key``."""
        return tuple(self._tensors[key].shape)


def _torch_load(shard: Path) -> dict[str, torch.Tensor]:
    """The state dict in a pickle shard, read with the weights-only unpickler (memory-mapped if possible)."""
    import pickle

    def load(mmap: bool):
        return torch.load(shard, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            state = load(mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = load(mmap=False)  # the legacy (non-zip) format cannot be mapped
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{shard.name} holds objects other than tensors, which torch.load(weights_only=True) refuses to "
            f"unpickle ({exc}). hf_hybrid never runs arbitrary pickle code: convert the checkpoint to "
            f"safetensors in an environment you trust."
        ) from exc
    except Exception as exc:  # truncated zip, bad magic number, ...
        raise CheckpointError(
            f"cannot read {shard.name}: {exc}. The file is truncated or corrupt: download it again."
        ) from exc
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        state = state.get("state_dict", state)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{shard.name} is not a state dict (a mapping of tensor names to tensors): it is not a "
            f"transformers checkpoint shard."
        )
    return state


@dataclass
class StreamedModule:
    """A module whose parameters live in one pinned host region and visit a device slot when it runs."""

    unit: str
    module: torch.nn.Module
    params: list[tuple[torch.nn.Module, str, tuple[int, ...]]]
    host_region: torch.Tensor
    host_views: list[torch.Tensor]
    dtype: torch.dtype


@dataclass
class LoadedModel:
    """What loading produced besides the model: the executor's groups and streamed modules."""

    groups: dict[int, ExpertGroup] = field(default_factory=dict)
    streamed: list[StreamedModule] = field(default_factory=list)
    cpu_embedding: bool = False
    host_bytes: int = 0


def host_memory_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where unknown."""
    return meminfo("MemAvailable")


def check_host_memory(plan: HybridPlan, device: torch.device | None = None) -> int:
    """Raise :class:`HostMemoryError` when what the plan keeps in host memory does not fit in available RAM.

    On a CUDA device that is the weights of every unit not resident on it; with ``device="cpu"`` (the CPU
    standing in for the accelerator) every weight and the KV cache live in host memory. Returns the bytes
    of weights kept on the host.
    """
    host_weights = sum(u.nbytes for u in plan.units if plan.homes[u.name] != GPU)
    if device is not None and device.type == "cpu":
        weights = sum(u.nbytes for u in plan.units)
        need = weights + plan.kv_cache_bytes
        what = (
            f"{format_bytes(need)} (weights {format_bytes(weights)}, KV cache "
            f"{format_bytes(plan.kv_cache_bytes)}; with device='cpu' the whole model lives in host memory)"
        )
        todo = (
            "Free host memory, lower max_context / max_batch_size, load in a smaller dtype, or use a machine "
            "with more RAM."
        )
    else:
        need = host_weights
        what = f"{format_bytes(need)} of weights"
        todo = "Raise gpu_memory, free host memory, or use a machine with more RAM."
    have = host_memory_available()
    if have is not None and need > have:
        raise HostMemoryError(
            f"this plan keeps {what} in host memory but only {format_bytes(have)} is available. {todo}"
        )
    return host_weights


def _param_owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    module_path, _, leaf = name.rpartition(".")
    return model.get_submodule(module_path), leaf


def load_weights(
    model: torch.nn.Module,
    reader: CheckpointReader,
    adapter: FamilyAdapter,
    plan: HybridPlan,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
) -> LoadedModel:
    """Materialise every tensor of ``model`` (built on meta) from ``reader`` into its planned home."""
    from transformers.utils.logging import tqdm

    pin = can_pin() and device.type == "cuda"
    result = LoadedModel()
    result.host_bytes = check_host_memory(plan, device)
    layers = adapter.layers(model)
    moe_layers = adapter.moe_layers(model)
    model_to_ckpt = {adapter.to_model_key(k): k for k in reader.keys()}

    # group module-tree params by unit
    by_unit: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        unit = adapter.unit_of_param(name, moe_layers)
        if unit is not None:
            by_unit.setdefault(unit, []).append((name, param))

    expert_units = [u for u in plan.units if u.is_expert_like]
    total = len(by_unit) + len(expert_units)
    bar = tqdm(total=total, desc="Loading weights", unit="unit", disable=not progress)
    try:
        for unit_name, params in by_unit.items():
            home = plan.homes.get(unit_name, GPU)
            tensors = []
            for name, param in params:
                key = model_to_ckpt.get(name)
                if key is None:
                    raise CheckpointError(
                        f"the checkpoint has no tensor for {name} (looked for it under {adapter.name} names); "
                        f"is this the right checkpoint for {type(model).__name__}?"
                    )
                _expect_shape(reader, key, tuple(param.shape))
                tensors.append((name, reader.get(key)))
            if home == STREAM:
                result.streamed.append(_stream_module(model, adapter, unit_name, tensors, dtype, pin))
            else:
                target = device if home == GPU else torch.device("cpu")
                for name, value in tensors:
                    owner, leaf = _param_owner(model, name)
                    owner._parameters[leaf] = torch.nn.Parameter(value.to(target, dtype), requires_grad=False)
                if unit_name == "embed_tokens" and home == CPU:
                    result.cpu_embedding = True
            bar.update(1)

        names = CheckpointNames(reader, adapter, model_to_ckpt)
        for i, layer in enumerate(layers):
            layer_units = [u for u in expert_units if u.layer == i]
            if not layer_units:
                continue
            group = _load_group(i, layer, layer_units, plan, names, i in moe_layers, device, dtype, pin, bar)
            result.groups[i] = group
    finally:
        bar.close()

    if model.config.tie_word_embeddings and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            raise CheckpointError(f"{name} was not loaded from the checkpoint")
    return result


def _stream_module(model, adapter, unit_name, tensors, dtype, pin) -> StreamedModule:
    shapes = [tuple(v.shape) for _, v in tensors]
    arena = HostArena(layout_bytes(shapes, dtype), pin)
    region = arena.take(layout_bytes(shapes, dtype))
    views = carve(region, shapes, dtype)
    params = []
    for (name, value), view in zip(tensors, views):
        view.copy_(value)
        owner, leaf = _param_owner(model, name)
        owner._parameters[leaf] = torch.nn.Parameter(view, requires_grad=False)
        params.append((owner, leaf, tuple(value.shape)))
    return StreamedModule(unit_name, owner_root(model, adapter, unit_name), params, region, views, dtype)


def owner_root(model: torch.nn.Module, adapter: FamilyAdapter, unit_name: str) -> torch.nn.Module:
    """The module whose forward a streamed unit's hook wraps."""
    if unit_name == "lm_head":
        return model.get_output_embeddings()
    m = re.match(r"layers\.(\d+)\.(attention|shared_expert)$", unit_name)
    if not m:
        raise ValueError(f"unit {unit_name} cannot be streamed")
    layer = adapter.layers(model)[int(m.group(1))]
    return adapter.attention(layer) if m.group(2) == "attention" else adapter.shared_expert(layer)


@dataclass
class CheckpointNames:
    """The checkpoint tensors of a layer's experts or dense MLP, found by the names the family adapter
    gives them (``model_to_ckpt`` maps :meth:`FamilyAdapter.to_model_key` of every checkpoint name back)."""

    reader: CheckpointReader
    adapter: FamilyAdapter
    model_to_ckpt: dict[str, str]

    def _find(self, keys) -> tuple[str, ...] | None:
        found = tuple(self.model_to_ckpt.get(k) for k in keys)
        return found if all(found) else None

    def expert(self, layer: int, expert: int) -> tuple[str, ...] | None:
        """Checkpoint names of one expert's (gate, up, down), or None when experts are not stored one by one."""
        return self._find(self.adapter.expert_weight_keys(layer, expert))

    def fused_experts(self, layer: int) -> tuple[str, ...] | None:
        """Checkpoint names of a layer's fused (gate_up, down) expert tensors, or None."""
        return self._find(self.adapter.fused_expert_weight_keys(layer))

    def dense_mlp(self, layer: int) -> tuple[str, ...]:
        """Checkpoint names of a dense MLP's (gate, up, down); :class:`CheckpointError` when one is missing."""
        wanted = self.adapter.dense_mlp_weight_keys(layer)
        for key in wanted:
            if key not in self.model_to_ckpt:
                raise CheckpointError(f"the checkpoint has no {key}")
        return tuple(self.model_to_ckpt[k] for k in wanted)


def _expect_shape(reader, key: str, expected: tuple[int, ...]) -> None:
    """Raise :class:`CheckpointError` naming ``key``, its shard and both shapes when they differ."""
    actual = tuple(reader.shape(key))
    if actual != tuple(expected):
        raise CheckpointError(
            f"tensor {key} in {reader.key_to_file[key].name} has shape {actual} but config.json expects "
            f"{tuple(expected)}: the shards do not match the config. Check that config.json and the weights "
            f"come from the same checkpoint."
        )


def _check_group_shapes(names: CheckpointNames, layer: int, units: list[Unit], routed: bool) -> None:
    """Check the full checkpoint tensors an expert group reads from, before any slice of them is taken
    (a row slice of a too-large dense MLP tensor would otherwise load silently)."""
    reader = names.reader
    for u in units:
        two_r, hidden = u.tensors[0].shape
        if not routed:
            inter = max(v.rows[1] for v in units)
            for key, expected in zip(
                names.dense_mlp(layer), ((inter, hidden), (inter, hidden), (hidden, inter))
            ):
                _expect_shape(reader, key, expected)
            return
        r = two_r // 2
        keys = names.expert(layer, u.index)
        if keys is not None:
            for key, expected in zip(keys, ((r, hidden), (r, hidden), (hidden, r))):
                _expect_shape(reader, key, expected)
            continue
        fused = names.fused_experts(layer)
        if fused is not None:
            experts = max(v.index for v in units) + 1
            _expect_shape(reader, fused[0], (experts, two_r, hidden))
            _expect_shape(reader, fused[1], (experts, hidden, r))
            return


def _read_unit(
    names: CheckpointNames, layer, unit: Unit, routed: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [r, H], up [r, H], down [H, r]) of an expert or MLP slice."""
    reader = names.reader
    if routed:
        keys = names.expert(layer, unit.index)
        if keys is not None:
            return tuple(reader.get(k) for k in keys)
        fused = names.fused_experts(layer)
        if fused is not None:
            gate_up = reader.get(fused[0])[unit.index]
            inter = gate_up.shape[0] // 2
            return gate_up[:inter], gate_up[inter:], reader.get(fused[1])[unit.index]
        raise CheckpointError(f"the checkpoint has no weights for expert {unit.index} of layer {layer}")
    lo, hi = unit.rows
    gate, up, down = names.dense_mlp(layer)
    return (
        reader.get(gate, rows=(lo, hi)),
        reader.get(up, rows=(lo, hi)),
        reader.get(down, cols=(lo, hi)),
    )


def _load_group(i, layer, units, plan, names, routed, device, dtype, pin, bar) -> ExpertGroup:
    act_fn = names.adapter.mlp_activation(layer)
    homes = [plan.homes[u.name] for u in units]
    group = ExpertGroup(layer=i, units=units, homes=homes, act_fn=act_fn, dtype=dtype, routed=routed)
    shapes = {u.index: (u.tensors[0].shape, u.tensors[1].shape) for u in units}
    group.shapes = shapes
    host_bytes = sum(layout_bytes(list(shapes[u.index]), dtype) for u, h in zip(units, homes) if h != GPU)
    _check_group_shapes(names, i, units, routed)
    arena = HostArena(host_bytes, pin) if host_bytes else None
    for u, home in zip(units, homes):
        gate, up, down = _read_unit(names, i, u, routed)
        gate_up_shape, down_shape = shapes[u.index]
        if tuple(gate.shape) + tuple(up.shape) != (gate_up_shape[0] // 2, gate_up_shape[1]) * 2 or tuple(
            down.shape
        ) != tuple(down_shape):
            raise CheckpointError(
                f"{u.name}: checkpoint shapes gate {tuple(gate.shape)}, up {tuple(up.shape)}, down "
                f"{tuple(down.shape)} do not match the config ({gate_up_shape}, {down_shape})"
            )
        if home == GPU:
            gate_up = torch.empty(gate_up_shape, dtype=dtype, device=device)
            half = gate_up_shape[0] // 2
            gate_up[:half].copy_(gate)
            gate_up[half:].copy_(up)
            group.device_weights[u.index] = (gate_up, down.to(device, dtype).contiguous())
        else:
            region = arena.take(layout_bytes([gate_up_shape, down_shape], dtype))
            gate_up, down_host = carve(region, [gate_up_shape, down_shape], dtype)
            half = gate_up_shape[0] // 2
            gate_up[:half].copy_(gate)
            gate_up[half:].copy_(up)
            down_host.copy_(down)
            group.host_regions[u.index] = region
            group.host_weights[u.index] = (gate_up, down_host)
        bar.update(1)
    # the module tree no longer owns these weights: the executor's group does
    names.adapter.drop_mlp_weights(layer)
    return group
