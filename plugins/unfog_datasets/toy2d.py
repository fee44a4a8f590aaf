"""Two-dimensional toy distributions for quick experiments and tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from unfog import register
from unfog.errors import ConfigError
from unfog_datasets._common import check_choice, check_index, check_int

Array = np.ndarray


def _swiss_roll(rng: np.random.Generator, n: int) -> Array:
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(n))
    pts = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) + 0.3 * rng.standard_normal((n, 2))
    return pts / 6.0


def _two_moons(rng: np.random.Generator, n: int) -> Array:
    upper = rng.random(n) < 0.5
    theta = np.pi * rng.random(n)
    x = np.where(upper, np.cos(theta), 1.0 - np.cos(theta))
    y = np.where(upper, np.sin(theta), 0.5 - np.sin(theta))
    pts = np.stack([x - 0.5, y - 0.25], axis=1) + 0.05 * rng.standard_normal((n, 2))
    return pts * 1.6


def _eight_gaussians(rng: np.random.Generator, n: int) -> Array:
    angles = np.pi / 4.0 * rng.integers(0, 8, size=n)
    centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return centers + 0.25 * rng.standard_normal((n, 2))


def _checkerboard(rng: np.random.Generator, n: int) -> Array:
    # A 4×4 board on [-2, 2]²; the points fill the 8 squares whose (column + row) is even.
    x = 4.0 * rng.random(n) - 2.0
    y = rng.random(n) - 2.0 * rng.integers(0, 2, size=n).astype(np.float64)
    y = y + np.floor(x) % 2.0
    return np.stack([x, y], axis=1) * 1.5


_GENERATORS: dict[str, Callable[[np.random.Generator, int], Array]] = {
    "swiss_roll": _swiss_roll,
    "two_moons": _two_moons,
    "eight_gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
}
TOY2D_NAMES: tuple[str, ...] = tuple(_GENERATORS)


def sample_toy2d(name: str, n: int, seed: int) -> Tensor:
    """Draw ``n`` points of the toy distribution ``name`` as an n×2 float32 tensor.

    The same (name, n, seed) always gives the same points. Every distribution lies within
    about [-3, 3]² with a standard deviation of roughly 1 per coordinate.

    Raises:
        ConfigError: for an unknown name or a negative ``n``.
    """
    check_choice("toy2d", "name", name, TOY2D_NAMES)
    check_int("toy2d", "n", n, minimum=0)
    check_int("toy2d", "seed", seed, minimum=0)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(_GENERATORS[name](rng, n).astype(np.float32))


@register("dataset", "toy2d")
class Toy2D(Dataset):
    """Two-dimensional point clouds (swiss roll, two moons, eight Gaussians, checkerboard).

    The points are drawn once, from ``seed``, when the dataset is built; fresh points of the
    same distribution come from :func:`sample_toy2d` with another seed.

    Args:
        name: which distribution.
        size: number of points.
        seed: seed of the points (a non-negative integer).
    """

    def __init__(
        self,
        name: Literal["swiss_roll", "two_moons", "eight_gaussians", "checkerboard"] = "swiss_roll",
        size: int = 10000,
        seed: int = 0,
    ) -> None:
        if name not in TOY2D_NAMES:
            raise ConfigError(
                f"toy2d: unknown name {name!r}; expected one of {', '.join(TOY2D_NAMES)} "
                f"(set dataset.name=...)."
            )
        check_int("toy2d", "size", size, minimum=1)
        check_int("toy2d", "seed", seed, minimum=0)
        self.name = name
        self.size = size
        self.seed = seed
        self.data_shape: tuple[int, ...] = (2,)
        self.data_range: tuple[float, float] | None = None
        self.fields: tuple[str, ...] = ("x",)
        self.num_classes: int | None = None
        self.class_names: tuple[str, ...] | None = None
        self.points = sample_toy2d(name, size, seed)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"x": self.points[check_index("toy2d", index, self.size)]}

    def __repr__(self) -> str:
        return f"Toy2D(name={self.name!r}, size={self.size}, seed={self.seed})"
