"""Any folder of images, optionally labelled by subfolder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from unfog import register
from unfog.errors import ConfigError, DataError
from unfog_datasets._common import IMAGE_RANGE, check_index, check_int, readable_files, uint8_to_unit

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursively, extension case-insensitive), sorted.

    Hidden files and folders (names starting with ``.``, such as macOS ``._x.jpg`` files or
    ``.ipynb_checkpoints``) are left out.
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath, name))
    return sorted(found)


def load_image(path: Path | str, *, size: int, mode: str, draft: bool = False) -> Tensor:
    """Load one image as float32 C×size×size in [-1, 1]: shorter side resized to ``size``
    (bicubic, antialiased), then centre-cropped. Raises whatever PIL raises."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        if draft:  # JPEG only: decode at a reduced scale that still covers size×size
            img.draft(mode, (size, size))
        img = ImageOps.exif_transpose(img)
        img = img.convert(mode)
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"image has no pixels ({w}×{h})")
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    if (nw, nh) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(arr.copy())
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    return uint8_to_unit(x).contiguous()


@register("dataset", "image_folder")
class ImageFolder(Dataset):
    """Every image under a folder (searched recursively), resized and centre-cropped to a square.

    Images are read with PIL (png, jpg, jpeg, bmp, webp, gif, tif, tiff, any letter case;
    hidden files skipped), converted to RGB or greyscale, their shorter side resized to
    ``size`` and the centre cropped to size×size, scaled to [-1, 1]. When every image lies in
    an immediate or deeper subfolder of ``root``, the names of the immediate subfolders,
    sorted, are the classes 0..K-1; otherwise the images are unlabelled. Images are loaded
    when requested, not held in memory.

    Args:
        root: the folder (``~`` is expanded).
        size: side of the square images.
        channels: 3 for RGB, 1 for greyscale.
        skip_bad_files: check every file when the dataset is built and leave out those that
            cannot be read (listed in ``skipped``), instead of failing when one is loaded.
    """

    def __init__(self, root: str, size: int = 64, channels: int = 3, skip_bad_files: bool = False) -> None:
        check_int("image_folder", "size", size, minimum=1)
        check_int("image_folder", "channels", channels, minimum=1)
        if channels not in (1, 3):
            raise ConfigError(
                f"image_folder: channels must be 3 (RGB) or 1 (greyscale); got {channels}. "
                "Set dataset.channels=3 or dataset.channels=1."
            )
        if not isinstance(root, (str, os.PathLike)) or not str(root):
            raise ConfigError(f"image_folder: root must be the path of a folder of images; got {root!r}.")
        path = Path(root).expanduser()
        if not path.exists():
            raise DataError(
                f"image_folder: the folder {str(path)!r} does not exist (root={root!r}). "
                "Set dataset.root to a folder holding images."
            )
        if not path.is_dir():
            raise DataError(
                f"image_folder: root {str(path)!r} is a file, not a folder. "
                "Set dataset.root to the folder that holds the images."
            )
        files = find_images(path)
        if not files:
            raise DataError(
                f"image_folder: no images found under {str(path)!r} (searched recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)}, any letter case). Check dataset.root."
            )
        self.root = str(path)
        self.size = size
        self.channels = channels
        self.skip_bad_files = skip_bad_files
        self._mode = "RGB" if channels == 3 else "L"

        self.skipped: list[str] = []
        if skip_bad_files:
            files = self._drop_bad(files)

        rel_parts = [f.relative_to(path).parts for f in files]
        labelled = all(len(parts) > 1 for parts in rel_parts)
        self.files: list[str] = [str(f) for f in files]
        self.data_shape: tuple[int, ...] = (channels, size, size)
        self.data_range: tuple[float, float] | None = IMAGE_RANGE
        if labelled:
            names = sorted({parts[0] for parts in rel_parts})
            index = {name: i for i, name in enumerate(names)}
            self.labels: list[int] | None = [index[parts[0]] for parts in rel_parts]
            self.class_names: tuple[str, ...] | None = tuple(names)
            self.num_classes: int | None = len(names)
            self.fields: tuple[str, ...] = ("x", "label")
        else:
            self.labels = None
            self.class_names = None
            self.num_classes = None
            self.fields = ("x",)

    def _drop_bad(self, files: list[Path]) -> list[Path]:
        return readable_files("image_folder", files, self.root, "image",
                              lambda f: load_image(f, size=self.size, mode=self._mode, draft=True), self.skipped)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index("image_folder", index, len(self.files))
        path = self.files[i]
        try:
            x = load_image(path, size=self.size, mode=self._mode)
        except Exception as exc:  # PIL raises many kinds of errors for broken files
            hint = (
                "The file was readable when the dataset was built; check whether it changed."
                if self.skip_bad_files
                else "Fix or remove it, or pass `dataset.skip_bad_files=true` to skip unreadable files."
            )
            raise DataError(
                f"image_folder: cannot read image {path!r} ({type(exc).__name__}: {exc}). {hint}"
            ) from exc
        item: dict[str, Any] = {"x": x}
        if self.labels is not None:
            item["label"] = torch.tensor(self.labels[i], dtype=torch.long)
        return item

    def __repr__(self) -> str:
        labels = f"{self.num_classes} classes" if self.num_classes is not None else "unlabelled"
        return f"ImageFolder(root={self.root!r}, n={len(self)}, shape={self.data_shape}, {labels})"
