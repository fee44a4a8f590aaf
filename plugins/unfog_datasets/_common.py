"""Helpers shared by the first-party datasets (not a dataset itself)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor

from unfog.errors import ConfigError

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
