"""Any folder of images, optionally labelled by subfolder and captioned."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unfog import register
from unfog.errors import ConfigError
from unfog_datasets._common import IMAGE_RANGE, check_int, uint8_to_unit
from unfog_datasets.folder import Captions, FolderDataset

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def image_size(size: Any) -> tuple[int, int]:
    """(height, width) from ``size``: one positive integer (a square) or a pair of them."""
    sides = list(size) if isinstance(size, (list, tuple)) else [size]
    if not 1 <= len(sides) <= 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sides):
        raise ConfigError(
            f"image_folder: size must be a positive integer (the side of a square) or a pair [height, width] of "
            f"them; got {size!r}. Set, for example, dataset.size=64 or dataset.size=[48,64]."
        )
    return sides[0], sides[-1]


def load_image(path: Path | str, *, size: int | tuple[int, int], mode: str, draft: bool = False) -> Tensor:
    """Load one image as float32 C×H×W in [-1, 1], (H, W) = ``size`` (an int: a square):
    resized (bicubic, antialiased) to the smallest size that covers H×W, then centre-cropped.
    Raises whatever PIL raises."""
    from PIL import Image, ImageOps

    height, width = (size, size) if isinstance(size, int) else size
    with Image.open(path) as img:
        if draft:  # JPEG only: decode at a reduced scale that still covers width×height
            img.draft(mode, (width, height))
        img = ImageOps.exif_transpose(img)
        img = img.convert(mode)
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"image has no pixels ({w}×{h})")
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    if (nw, nh) != (width, height):
        img = img.crop((left, top, left + width, top + height))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    return uint8_to_unit(x).contiguous()


@register("dataset", "image_folder")
class ImageFolder(FolderDataset):
    """Every image under a folder (searched recursively), resized and centre-cropped.

    Images are read with PIL (png, jpg, jpeg, bmp, webp, gif, tif, tiff, any letter case;
    hidden files skipped), converted to RGB or greyscale, resized to the smallest size that
    covers ``size`` (for a square: the shorter side to ``size``) and centre-cropped, scaled to
    [-1, 1]. When every image lies in an immediate or deeper subfolder of ``root``, the names
    of the immediate subfolders, sorted, are the classes 0..K-1 (field ``label``); otherwise
    the images are unlabelled. Captions (field ``caption``) come from a ``metadata.jsonl``
    (lines ``{"file_name": "a.png", "text": "..."}``) or a ``NAME.txt`` beside ``NAME.png``.
    Images are loaded when requested, not held in memory.

    Args:
        root: the folder (``~`` is expanded).
        size: side of square images, or [height, width].
        channels: 3 for RGB, 1 for greyscale.
        skip_bad_files: check every file when the dataset is built and leave out those that
            cannot be read (listed in ``skipped``), instead of failing when one is loaded.
        captions: ``auto`` uses captions when the folder has any and refuses images without
            one; ``optional`` gives those the caption ``""``; ``none`` ignores captions.
    """

    name = "image_folder"
    what = "image"
    extensions = IMAGE_EXTENSIONS

    def __init__(
        self,
        root: str,
        size: int | Sequence[int] = 64,
        channels: int = 3,
        skip_bad_files: bool = False,
        captions: Captions = "auto",
    ) -> None:
        height, width = image_size(size)
        check_int("image_folder", "channels", channels, minimum=1)
        if channels not in (1, 3):
            raise ConfigError(
                f"image_folder: channels must be 3 (RGB) or 1 (greyscale); got {channels}. "
                "Set dataset.channels=3 or dataset.channels=1."
            )
        self.size = size if isinstance(size, int) else (height, width)
        self.channels = channels
        self._hw = (height, width)
        self._mode = "RGB" if channels == 3 else "L"
        self.data_shape: tuple[int, ...] = (channels, height, width)
        self.data_range: tuple[float, float] | None = IMAGE_RANGE
        super().__init__(root, skip_bad_files=skip_bad_files, captions=captions)

    def load(self, path: str, index: int) -> Tensor:
        """One image, resized and cropped to ``data_shape``."""
        return load_image(path, size=self._hw, mode=self._mode)

    def check(self, path: Path) -> None:
        """Decode ``path`` (JPEGs at a reduced scale), raising if it cannot be read."""
        load_image(path, size=self._hw, mode=self._mode, draft=True)
