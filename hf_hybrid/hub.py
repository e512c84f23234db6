"""Where a checkpoint comes from: a local directory used in place, or a hub snapshot (offline-aware, failing
fast with one clear line when the hub cannot be reached)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from transformers.utils import logging

from .checkpoint import (
    PICKLE_PATTERNS,
    WEIGHT_PATTERNS,
    check_config,
    checkpoint_files,
    find_weights,
    require_regular_file,
)
from .errors import WeightsNotFoundError

logger = logging.get_logger(__name__)


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
    weights as :func:`checkpoint_files` finds them (pickle ones only with ``allow_pickle=True``), and every
    shard its index names is present. What it allows is not remembered: pass the same ``allow_pickle`` to
    :class:`CheckpointReader`.
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
    if os.path.lexists(directory / "generation_config.json"):  # from_pretrained reads it too
        require_regular_file(directory / "generation_config.json")
    checkpoint_files(directory, allow_pickle=allow_pickle)
    return directory


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


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a hub call raises when the hub cannot be reached.

    huggingface_hub wraps most of these in LocalEntryNotFoundError, but not every path does, and httpx's
    errors are not OSErrors (``OfflineModeIsEnabled`` is a ConnectionError, so an OSError).
    """
    errors: list[type[BaseException]] = [OSError]
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:  # pragma: no cover - huggingface_hub depends on httpx
        pass
    return tuple(errors)


#: What ``hf-hybrid plan`` can do without the hub; said in every unreachable/offline message.
_PLAN_HINT = "'hf-hybrid plan' also works from a local directory holding only config.json"


def hub_unreachable_message(repo_id: str, reason: object) -> str:
    """What to say when the hub could not be reached for ``repo_id`` and the cache does not hold it."""
    return (
        f"could not reach the Hugging Face hub for {repo_id!r}, and it is not in the local cache "
        f"({' '.join(str(reason).split())}). Check the network, or set HF_HUB_OFFLINE=1 to use only the local "
        f"cache (no network, no retries), or pass a local directory; {_PLAN_HINT}."
    )


def fetch_config(
    repo_id: str,
    *,
    also: Iterable[str] = (),
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """A directory holding ``repo_id``'s config.json (and the files matching the patterns ``also``).

    The local cache is tried first, so a cached model needs no network at all; only then the hub, through
    ``snapshot_download``, which fails at once without a network where transformers' per-file downloads
    retry for half a minute. A cache hit needs config.json and, when ``also`` is given, one file matching it.
    Errors are :class:`WeightsNotFoundError` saying what to do (see :func:`hub_unreachable_message`).
    """
    also = list(also)
    patterns = ["config.json", *also]
    try:
        cached = _snapshot(repo_id, revision, token, cache_dir, "local_files_only=True", patterns)
    except WeightsNotFoundError:
        cached = None
    if cached is not None and (cached / "config.json").is_file():
        if not also or any(next(cached.glob(pattern), None) for pattern in also):
            return cached
    return _snapshot(repo_id, revision, token, cache_dir, _offline_reason(local_files_only), patterns)


def _offline_reason(local_files_only: bool) -> str | None:
    """Why hub traffic is off (None when it is allowed)."""
    if local_files_only:
        return "local_files_only=True"
    if hub_offline():
        return "HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set"
    return None


def _download(repo_id, revision, token, cache_dir, local_files_only, allow_pickle: bool) -> Path:
    """Fetch config.json first (an unsupported architecture is refused before any weight is downloaded),
    then the safetensors shards; pickle shards only when there are none and ``allow_pickle``."""
    offline = _offline_reason(local_files_only)
    directory = _snapshot(repo_id, revision, token, cache_dir, offline, ["config.json"])
    check_config(directory)
    directory = _snapshot(repo_id, revision, token, cache_dir, offline, WEIGHT_PATTERNS)
    if allow_pickle and find_weights(directory, pickle=False) is None:
        directory = _snapshot(
            repo_id, revision, token, cache_dir, offline, [*WEIGHT_PATTERNS, *PICKLE_PATTERNS]
        )
    return directory


def _snapshot(repo_id, revision, token, cache_dir, offline: str | None, patterns: list[str]) -> Path:
    """``snapshot_download`` with its errors turned into :class:`WeightsNotFoundError` saying what to do.

    ``offline`` is why hub traffic is off (None when it is allowed).
    """
    from huggingface_hub import errors as hub
    from huggingface_hub import snapshot_download

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
    except hub.HFValidationError as exc:
        raise WeightsNotFoundError(
            f"{repo_id!r} is neither a local directory nor a valid Hugging Face hub id ('owner/name'): {exc}"
        ) from exc
    except hub.GatedRepoError as exc:
        raise WeightsNotFoundError(
            f"{repo_id!r} is a gated model: accept its terms on https://huggingface.co/{repo_id} and pass "
            f"token= (or log in with `hf auth login`)."
        ) from exc
    except hub.RepositoryNotFoundError as exc:
        raise WeightsNotFoundError(
            f"{repo_id!r} is neither a local directory nor a model on the Hugging Face hub (check the name, or "
            f"pass token= for a gated/private model)"
        ) from exc
    except hub.RevisionNotFoundError as exc:
        raise WeightsNotFoundError(
            f"{repo_id!r} has no revision {revision!r}: pass an existing branch, tag or commit."
        ) from exc
    except hub.LocalEntryNotFoundError as exc:
        if offline is not None:
            raise WeightsNotFoundError(
                f"{repo_id!r} is not a local directory and is not in the Hugging Face cache, and hub downloads "
                f"are off ({offline}). Check the name, download it once while online, or pass a local "
                f"directory; {_PLAN_HINT}."
            ) from exc
        unreachable: BaseException = exc
    except (hub.HfHubHTTPError, *_network_errors()) as exc:
        unreachable = exc
    raise WeightsNotFoundError(hub_unreachable_message(repo_id, unreachable)) from unreachable


# ------------------------------------------------------------------------------------ reading tensors
