"""Facts about the host read from the operating system (Linux /proc, with portable fallbacks)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def meminfo(key: str) -> int | None:
    """The ``key`` line of /proc/meminfo (``"MemAvailable"``, ``"MemTotal"``) in bytes, or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_model() -> str:
    """The CPU's model name (x86 "model name", Arm "Hardware"/"CPU model"), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except (OSError, IndexError):
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def cache_root() -> Path:
    """Where hf_hybrid keeps what it builds once: ``$HF_HYBRID_CACHE``, else ``~/.cache/hf_hybrid``."""
    env = os.environ.get("HF_HYBRID_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_hybrid"
