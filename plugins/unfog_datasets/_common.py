"""Helpers shared by the first-party datasets (not a dataset itself)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unfog.errors import ConfigError, DataError

IMAGE_RANGE: tuple[float, float] = (-1.0, 1.0)


def uint8_to_unit(x: Tensor) -> Tensor:
    """Map uint8 pixel values 0..255 to float32 in [-1, 1]."""
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def check_int(owner: str, name: str, value: Any, *, minimum: int) -> int:
    """Refuse a non-integer or too small integer setting with a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner}: {name} must be an integer; got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ConfigError(f"{owner}: {name} must be at least {minimum}; got {value}.")
    return value


def check_choice(owner: str, name: str, value: Any, choices: Collection[Any]) -> Any:
    """Refuse a setting outside ``choices`` with a ConfigError listing them."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{owner}: {name} must be one of {options}; got {value!r}.")
    return value


def check_index(owner: str, index: int, length: int) -> int:
    """Normalise a possibly negative index, raising IndexError when out of range."""
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"{owner}: index {index} is out of range for a dataset of {length} items.")
    return index


SHOW_SKIPPED = 5  # bad files named in the warning; the rest are counted


def readable_files(owner: str, files: Sequence[Path], root: str, what: str,
                   check: Callable[[Path], Any], skipped: list[str]) -> list[Path]:
    """The ``files`` that ``check`` reads without raising; the others are appended to
    ``skipped`` (path and error) and reported in one warning. None readable: DataError."""
    good: list[Path] = []
    for f in files:
        try:
            check(f)
        except Exception as exc:  # decoders report broken files with many error types
            skipped.append(f"{f} ({type(exc).__name__}: {exc})")
        else:
            good.append(f)
    if not good:
        raise DataError(
            f"{owner}: none of the {len(files)} {what} files under {root!r} could be read; for example {skipped[0]}."
        )
    if skipped:
        extra = len(skipped) - SHOW_SKIPPED
        more = f" and {extra} more" if extra > 0 else ""
        warnings.warn(
            f"{owner}: skipped {len(skipped)} of {len(files)} {what} files under {root!r} that could not be "
            f"read: {'; '.join(skipped[:SHOW_SKIPPED])}{more}. Their list is in the dataset's `skipped`.",
            RuntimeWarning,
            stacklevel=4,
        )
    return good
