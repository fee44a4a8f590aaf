"""Reading checkpoint files, which are untrusted input.

Every checkpoint unfog reads goes through :func:`read_checkpoint`: it is loaded with
``weights_only=True`` (a pickle that would run code is refused, never run), and whatever is
wrong with the file — missing, empty, truncated, random bytes, code in it, another program's
checkpoint — is one :class:`~unfog.errors.CheckpointError` that names the file, says what it
is and what to do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from unfog.errors import CheckpointError

KEY = "unfog"  # the section of a Lightning checkpoint where unfog keeps config, wiring and versions


def read_checkpoint(path: str | Path, *, what: str = "checkpoint", mmap: bool = False) -> dict[str, Any]:
    """The contents of an unfog training checkpoint (``state_dict``, the ``unfog`` section, ...).

    ``what`` is the config key the path came from (``checkpoint``, ``ckpt_path``), for messages.
    With ``mmap`` the tensors are mapped, not read (for looking at metadata and key names).
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what}={path} does not exist; pass a run's checkpoints/last.ckpt.")
    if path.is_dir():
        raise CheckpointError(f"{what}={path} is a folder; pass a checkpoint file such as "
                              f"{path / 'checkpoints' / 'last.ckpt'}.")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{what}={path} is empty (0 bytes): the write that made it did not finish. "
                              "Use an earlier checkpoint of the run.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and _is_zip(path))
    except Exception as exc:  # torch reports bad files with many exception types
        raise CheckpointError(_why_unreadable(path, what, size, exc)) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{what}={path} holds a {type(ckpt).__name__}, not a training checkpoint; "
                              "pass a run's checkpoints/last.ckpt.")
    if KEY not in ckpt or not isinstance(ckpt[KEY], dict) or "config" not in ckpt[KEY]:
        keys = ", ".join(sorted(map(str, ckpt))[:6]) or "nothing"
        raise CheckpointError(
            f"{what}={path} is a PyTorch file but not an unfog training checkpoint (it has no '{KEY}' "
            f"section with the config; its keys: {keys}). Pass a checkpoint written by `unfog train`, or load "
            "another program's weights into a backbone made for them (e.g. backbone=diffusers_folder)."
        )
    if not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{what}={path} has no model weights (no 'state_dict'); it is incomplete.")
    return ckpt


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _why_unreadable(path: Path, what: str, size: int, exc: Exception) -> str:
    text = str(exc)
    blocked = re.search(r"GLOBAL ([\w.]+)", text)  # the object a pickle names, which would be called
    if blocked:
        name = blocked.group(1)
        return (f"{what}={path} was refused: it holds {name}, which loading would have to run as code. unfog reads "
                "checkpoints with torch.load(weights_only=True) and never runs code from them; use a checkpoint "
                "written by `unfog train`.")
    if _is_zip(path):
        return (f"{what}={path} is damaged or incomplete ({size} bytes; torch: {_gist(text)}). A copy or "
                "write was cut short; use the run's previous checkpoint or copy the file again.")
    return (f"{what}={path} is not a PyTorch checkpoint ({size} bytes that torch.load cannot read as one). "
            "Pass a run's checkpoints/last.ckpt.")


def _gist(text: str) -> str:
    """The first sentence of torch's message (its advice that follows is about torch.load)."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first.split(". ")[0].rstrip(".")[:160]
