"""Helpers every part of unfog shares, written once: file hashes, the versions that made a
result, and the device a command runs on. Plugins use these too."""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from unfog.errors import ConfigError

ALWAYS_VERSIONED: tuple[str, ...] = ("unfog", "torch", "lightning")


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file (or of every file of a folder, in name order, names included)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def version_of(distribution: str) -> str:
    """The installed version of ``distribution``, or ``"unknown"``."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def versions(distributions: Iterable[str | None] = ()) -> dict[str, str]:
    """Versions of unfog, torch, lightning and the given distributions (those providing the
    components a result was made with), sorted by name: what every record stores."""
    names = set(ALWAYS_VERSIONED) | {d for d in distributions if d}
    return {name: version_of(name) for name in sorted(names)}


def resolve_device(device: Any = "auto") -> Any:
    """``"auto"`` → CUDA when available, else the CPU; anything else as torch reads it, refused
    with a ConfigError when torch does not know it or it is not available here."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={device!r} is not a torch device; use auto, cpu or cuda[:N].") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}, but CUDA is not available here; use device=auto or device=cpu.")
    return resolved
