"""Finding a checkpoint's files and reading its tensors by name, as transformers finds and reads them.

A directory's weights are, in this order (safetensors first, then pickle, which needs ``allow_pickle=True``):
the shards its ``model.safetensors.index.json`` names (each tensor from the shard the index names), else
``model.safetensors``, else its one ``*.safetensors`` file; several ``*.safetensors`` files and no index are
refused rather than guessed at. Only regular files are opened: a FIFO or device in their place would block
``open`` forever.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, KeysView
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from transformers.utils import logging

from .errors import CheckpointError, WeightsNotFoundError
from .families import for_config

logger = logging.get_logger(__name__)

WEIGHT_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.model",
    "*.txt",
    "*.jinja",
    "*.py",
]
#: Pickle shards hf_hybrid reads with ``allow_pickle=True`` (``training_args.bin`` and the like are not weights).
PICKLE_PATTERNS = ["pytorch_model*.bin", "model*.bin", "pytorch_model*.bin.index.json"]
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
#: per format (pickle or not): the index, the single-file name, the names a lone weight file may have
_FORMATS = {
    False: (SAFETENSORS_INDEX, "model.safetensors", ("*.safetensors",)),
    True: (PICKLE_INDEX, "pytorch_model.bin", ("pytorch_model*.bin", "model*.bin")),
}


# ------------------------------------------------------------------------------------ which files
@dataclass
class CheckpointFiles:
    """The weight files of a checkpoint directory: ``shards`` in reading order, and with an index, which
    tensors the index places in each (``by_shard``; None when the one file holds the whole checkpoint)."""

    directory: Path
    shards: tuple[Path, ...]
    pickle: bool = False
    index: Path | None = None
    by_shard: dict[Path, list[str]] | None = None
    ignored: tuple[str, ...] = ()

    def log_ignored(self) -> None:
        """Log the weight files beside these that are not read: a warning when the index wins over a
        ``model.safetensors`` (``pytorch_model.bin``), which transformers would read instead."""
        if self.ignored:
            single = _FORMATS[self.pickle][1]
            log = logger.warning if self.index and single in self.ignored else logger.info
            reading = f"the shards {self.index.name} names" if self.index else self.shards[0].name
            log("hf_hybrid: %s: reading %s, not %s", self.directory, reading, ", ".join(self.ignored))

    def keys_in(self, shard: Path, held: Iterable[str]) -> list[str]:
        """The tensors to read from ``shard``, which holds ``held``: all of them, or those the index places
        there (:class:`CheckpointError` when the shard lacks one)."""
        if self.by_shard is None:
            return list(held)
        wanted = self.by_shard[shard]
        absent = sorted(set(wanted).difference(held))
        if absent:
            raise CheckpointError(
                f"{self.index.name} in {self.directory} places {len(absent)} tensor(s) in {shard.name}, which "
                f"does not hold them ({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''}): the index and "
                f"the shards do not match. Download them again."
            )
        return wanted

    def keys(self) -> list[str] | None:
        """Every tensor name, read cheaply: from the index, or from a safetensors file's header; None for a
        single pickle file, whose names only unpickling it would give."""
        if self.by_shard is not None:
            return [key for keys in self.by_shard.values() for key in keys]
        return None if self.pickle else list(open_safetensors(self.shards[0]).keys())


def require_regular_file(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a regular file (links followed).

    Opening a FIFO blocks until something writes to it, and a device reads forever: neither is a weight file.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        broken = " (a link whose target is missing)" if os.path.islink(path) else ""
        raise CheckpointError(f"cannot open {path}{broken}: {exc}. Download it again.") from exc
    if stat.S_ISREG(mode):
        return
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    )
    kind = next((name for test, name in kinds if test(mode)), "a device")
    raise CheckpointError(
        f"{path} is {kind}, not a regular file: hf_hybrid opens only regular files as checkpoint files. "
        f"Replace it with the file it stands for."
    )


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a ``*.index.json``, checked."""
    require_regular_file(index)
    where = f"{index.name} in {index.parent}"
    try:
        with open(index) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read {where} ({exc!r}): it should be JSON with a 'weight_map' of tensor name -> shard "
            f"file. Download it again."
        ) from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        what = "has no 'weight_map'" if weight_map is None else "has a 'weight_map' that is not a mapping"
        raise CheckpointError(
            f"{where} {'names no tensors' if weight_map == {} else what}: it should map tensor names to shard "
            f"files. Download it again."
        )
    bad = next((key for key, name in weight_map.items() if not isinstance(name, str) or not name), None)
    if bad is not None:
        raise CheckpointError(
            f"{where}: 'weight_map' gives tensor {bad!r} the shard {weight_map[bad]!r}, which is not a file name. "
            f"Download it again."
        )
    return weight_map


def find_weights(directory: Path, *, pickle: bool) -> CheckpointFiles | None:
    """The safetensors (or with ``pickle``, the ``pytorch_model*.bin``) weight files of ``directory``, chosen
    as the module docstring says; None when it has none of that format."""
    index_name, single_name, patterns = _FORMATS[pickle]
    found = sorted({p for pattern in patterns for p in directory.glob(pattern)})
    index, single = directory / index_name, directory / single_name
    if os.path.lexists(index):
        by_name: dict[str, list[str]] = {}
        for key, name in read_index(index).items():
            by_name.setdefault(name, []).append(key)
        missing = sorted(name for name in by_name if not (directory / name).exists())
        if missing:
            raise CheckpointError(
                f"{index_name} in {directory} names {len(missing)} shard(s) that are not there "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): the download is incomplete. "
                f"Download the missing shards."
            )
        by_shard = {directory / name: keys for name, keys in sorted(by_name.items())}
        files = CheckpointFiles(directory, tuple(by_shard), pickle, index, by_shard)
    elif os.path.lexists(single) or len(found) == 1:
        files = CheckpointFiles(directory, (single if os.path.lexists(single) else found[0],), pickle)
    elif found:
        raise CheckpointError(
            f"{directory} holds {len(found)} weight files ({', '.join(p.name for p in found[:5])}"
            f"{', ...' if len(found) > 5 else ''}) but no {index_name} saying which tensors each holds, and none "
            f"is {single_name}: hf_hybrid does not guess which are the model's weights. Keep only the model's "
            f"weights there, or add the index that came with them."
        )
    else:
        return None
    for shard in files.shards:
        require_regular_file(shard)
    files.ignored = tuple(p.name for p in found if p not in files.shards)
    return files


def checkpoint_files(directory: Path, *, allow_pickle: bool) -> CheckpointFiles:
    """The weight files of ``directory``: safetensors if it has any, else pickle shards when ``allow_pickle``.

    :class:`WeightsNotFoundError` when it has no weights, or only pickle ones and ``allow_pickle`` is False.
    """
    directory = Path(directory)
    files = find_weights(directory, pickle=False)
    if files is not None:
        return files
    _, _, patterns = _FORMATS[True]
    pickled = sorted({p.name for pattern in [*patterns, PICKLE_INDEX] for p in directory.glob(pattern)})
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
            f"{directory} holds only pickle checkpoints ({', '.join(pickled[:3])}); hf_hybrid reads safetensors "
            f"and refuses pickle files by default. Convert them (transformers: load then "
            f"save_pretrained(safe_serialization=True)), or pass allow_pickle=True to load them with "
            f"torch.load(weights_only=True)."
        )
    return find_weights(directory, pickle=True)


# ------------------------------------------------------------------------------------ checks
def check_config(directory: Path) -> dict:
    """The raw config.json of ``directory``, checked to be readable and of a supported architecture.

    Runs before transformers sees the config, so an unsupported or custom-code model is refused without
    importing anything from the checkpoint.
    """
    config_path = directory / "config.json"
    if not os.path.lexists(config_path):
        raise WeightsNotFoundError(
            f"{directory} has no config.json: pass the directory of a transformers checkpoint (config.json and "
            f"*.safetensors shards) or a hub id."
        )
    require_regular_file(config_path)
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


# ------------------------------------------------------------------------------------ where the checkpoint is


def open_safetensors(shard: Path) -> safe_open:
    """``safe_open`` of ``shard``, its errors turned into :class:`CheckpointError`."""
    try:
        return safe_open(str(shard), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for truncated headers
        raise CheckpointError(
            f"cannot read {shard.name}: {exc}. The file is truncated or corrupt: download it again."
        ) from exc


class CheckpointReader:
    """Lazy, memory-mapped access to every tensor of a checkpoint by name.

    Reads the files :func:`checkpoint_files` chooses. A directory with only pickle shards
    (``pytorch_model*.bin``) gives a :class:`PickleCheckpointReader` instead, with the same interface, when
    ``allow_pickle=True``; otherwise it is refused.
    """

    def __new__(cls, directory: Path, *, allow_pickle: bool = False):
        if cls is CheckpointReader and checkpoint_files(directory, allow_pickle=allow_pickle).pickle:
            cls = PickleCheckpointReader
        return super().__new__(cls)

    def __init__(self, directory: Path, *, allow_pickle: bool = False):
        self.directory = Path(directory)
        self.files = checkpoint_files(self.directory, allow_pickle=allow_pickle)
        if self.files.pickle != isinstance(self, PickleCheckpointReader):
            raise WeightsNotFoundError(
                f"{self.directory}: open it with CheckpointReader, not {type(self).__name__}"
            )
        self.files.log_ignored()
        self.key_to_file: dict[str, Path] = {}
        self._shards: dict[Path, object] = {}
        for shard in self.files.shards:
            self._shards[shard] = self._open(shard)
            keys = self.files.keys_in(shard, self._shards[shard].keys())
            self.key_to_file.update(dict.fromkeys(keys, shard))

    def _open(self, shard: Path):
        return open_safetensors(shard)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def keys(self) -> KeysView[str]:
        """All tensor names."""
        return self.key_to_file.keys()

    def get(
        self, key: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The tensor ``key`` (or a row / column range of it), read from the mapped file."""
        handle = self._shards[self.key_to_file[key]]
        try:
            if rows is None and cols is None:
                return handle.get_tensor(key)
            return handle.get_slice(key)[_slices(rows, cols)]
        except Exception as exc:
            raise CheckpointError(
                f"cannot read tensor {key} from {self.key_to_file[key].name}: {exc}. The shard is corrupt or "
                f"truncated: download it again."
            ) from exc

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` without reading it."""
        return tuple(self._shards[self.key_to_file[key]].get_slice(key).get_shape())


def _slices(rows: tuple[int, int] | None, cols: tuple[int, int] | None) -> tuple[slice, slice]:
    return (slice(*rows) if rows else slice(None), slice(*cols) if cols else slice(None))


class PickleCheckpointReader(CheckpointReader):
    """:class:`CheckpointReader` over ``pytorch_model*.bin`` shards (sharded with
    ``pytorch_model.bin.index.json`` or not).

    Each shard is opened with ``torch.load(map_location="cpu", weights_only=True, mmap=True)``: the restricted
    unpickler that only rebuilds tensors (no arbitrary code), and tensors backed by the mapped file, so
    nothing is read until it is used.
    """

    def _open(self, shard: Path) -> dict[str, torch.Tensor]:
        return _torch_load(shard)

    def get(
        self, key: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The tensor ``key`` (or a row / column range of it), backed by the mapped file."""
        tensor = self._shards[self.key_to_file[key]][key]
        return tensor if rows is None and cols is None else tensor[_slices(rows, cols)]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key``."""
        return tuple(self._shards[self.key_to_file[key]][key].shape)


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
