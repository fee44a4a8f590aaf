"""Turning samples into pictures: image grids and 2-D scatter plots, saved as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def image_grid(x: Tensor, nrow: int | None = None, value_range: tuple[float, float] = (-1.0, 1.0),
               pad: int = 1) -> np.ndarray:
    """Tile images (N, C, H, W) into one uint8 picture (H', W', C) with ``nrow`` per row."""
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    lo, hi = value_range
    img = ((x.detach().float().cpu().clamp(lo, hi) - lo) / (hi - lo) * 255).round().to(torch.uint8)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img[k]
    return grid.permute(1, 2, 0).numpy()


def scatter(points: Tensor, size: int = 256, extent: float = 4.0) -> np.ndarray:
    """Render 2-D points as a density picture (uint8, H×W×1) over [-extent, extent]²."""
    p = points.detach().float().cpu().numpy()
    hist, _, _ = np.histogram2d(p[:, 1], p[:, 0], bins=size, range=[[-extent, extent], [-extent, extent]])
    hist = np.flipud(hist)
    scale = np.log1p(hist) / max(np.log1p(hist).max(), 1e-9)
    return (255 - scale * 255).astype(np.uint8)[..., None]


def picture(samples: Tensor, nrow: int | None = None,
            value_range: tuple[float, float] | None = (-1.0, 1.0)) -> np.ndarray | None:
    """A picture of a batch of samples: a grid for images, a scatter plot for 2-D points."""
    if samples.ndim == 4:
        return image_grid(samples, nrow, value_range or _range_of(samples))
    if samples.ndim == 2 and samples.shape[1] == 2:
        return scatter(samples)
    return None


VISIBLE_WIDTH = 256  # pixels: a grid narrower than this is enlarged


def visible(picture: np.ndarray, width: int = VISIBLE_WIDTH) -> np.ndarray:
    """``picture`` (H×W×C uint8) enlarged by a whole factor, each pixel a block (no smoothing,
    so pixels stay pixels), until it is at least ``width`` pixels across."""
    factor = max(1, -(-width // picture.shape[1]))
    return picture if factor == 1 else picture.repeat(factor, axis=0).repeat(factor, axis=1)


def _range_of(x: Tensor) -> tuple[float, float]:
    return float(x.min()), float(x.max()) + 1e-8


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 H×W×C array (C = 1 or 3) as PNG, creating parent folders."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
    return path
