"""scikit-learn's bundled 8×8 handwritten digits, with a fixed stratified train/test split."""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from unfog import register
from unfog.errors import ConfigError, DataError
from unfog_datasets._common import IMAGE_RANGE, check_choice, check_index, check_int

DIGITS_SPLITS: tuple[str, ...] = ("train", "test", "all")
DIGITS_SPLIT_SEED = 0
DIGIT_NAMES: tuple[str, ...] = tuple(str(i) for i in range(10))


def check_test_fraction(owner: str, test_fraction: float) -> float:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise ConfigError(f"{owner}: test_fraction must be a number; got {test_fraction!r}.")
    if not (math.isfinite(test_fraction) and 0.0 < test_fraction < 1.0):
        raise ConfigError(
            f"{owner}: test_fraction must lie strictly between 0 and 1 (e.g. 0.2); got {test_fraction}."
        )
    return float(test_fraction)


@functools.lru_cache(maxsize=8)
def _split_indices(test_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DataError(
            f"digits: scikit-learn is needed for the digits data but could not be imported ({exc}); "
            "run `pip install scikit-learn`."
        ) from exc
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)  # N×8×8, values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    try:
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)),
            test_size=test_fraction,
            stratify=labels,
            random_state=DIGITS_SPLIT_SEED,
        )
    except ValueError as exc:
        raise ConfigError(
            f"digits: test_fraction={test_fraction} cannot split {len(labels)} images of 10 classes "
            f"into a stratified train and test set ({exc}); use a value such as 0.2."
        ) from exc
    for arr in (images, labels):
        arr.setflags(write=False)
    return images, labels, np.sort(train_idx), np.sort(test_idx)


def digits_split(split: str, test_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """The images and labels of one split of the 8×8 digits (1,797 images in all).

    The split is stratified by class and fixed (seed 0), so the dataset and the
    ``digits_classifier`` metric agree on which images are training images.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"`` (every image, in scikit-learn's order).
        test_fraction: share of each class held out as the test split.

    Returns:
        images as a float32 tensor N×1×8×8 in [-1, 1], and labels as an int64 tensor N.
    """
    check_choice("digits", "split", split, DIGITS_SPLITS)
    images, labels, train_idx, test_idx = _split_indices(check_test_fraction("digits", test_fraction))
    if split == "train":
        images, labels = images[train_idx], labels[train_idx]
    elif split == "test":
        images, labels = images[test_idx], labels[test_idx]
    x = torch.tensor(images, dtype=torch.float32).div_(8.0).sub_(1.0).unsqueeze(1)
    return x, torch.tensor(labels, dtype=torch.long)


@register("dataset", "digits")
class Digits(Dataset):
    """scikit-learn's 8×8 handwritten digits (no download), labelled 0-9, scaled to [-1, 1].

    A small real image dataset that trains in minutes on a CPU. Pixel values 0..16 map to
    [-1, 1]. The train/test split is stratified and fixed (seed 0); the
    ``digits_classifier`` metric trains on the same training split.

    Args:
        split: ``"train"`` (80 % by default), ``"test"`` or ``"all"``.
        test_fraction: share of each class held out as the test split.
        upscale: integer upscaling factor; 2 gives 16×16 images.
        upscale_mode: ``"nearest"`` repeats pixels, ``"bilinear"`` interpolates.
    """

    def __init__(
        self,
        split: Literal["train", "test", "all"] = "train",
        test_fraction: float = 0.2,
        upscale: int = 1,
        upscale_mode: Literal["nearest", "bilinear"] = "nearest",
    ) -> None:
        check_choice("digits", "split", split, DIGITS_SPLITS)
        check_int("digits", "upscale", upscale, minimum=1)
        check_choice("digits", "upscale_mode", upscale_mode, ("nearest", "bilinear"))
        if upscale > 16:
            raise ConfigError(f"digits: upscale must be at most 16 (8×8 → 128×128); got {upscale}.")
        self.split = split
        self.test_fraction = check_test_fraction("digits", test_fraction)
        self.upscale = upscale
        self.upscale_mode = upscale_mode
        images, labels = digits_split(split, self.test_fraction)
        if upscale > 1:
            kwargs: dict[str, Any] = {} if upscale_mode == "nearest" else {"align_corners": False}
            images = F.interpolate(images, scale_factor=upscale, mode=upscale_mode, **kwargs)
            images = images.clamp_(-1.0, 1.0).contiguous()
        self.images = images
        self.labels = labels
        side = 8 * upscale
        self.data_shape: tuple[int, ...] = (1, side, side)
        self.data_range: tuple[float, float] | None = IMAGE_RANGE
        self.fields: tuple[str, ...] = ("x", "label")
        self.num_classes: int | None = 10
        self.class_names: tuple[str, ...] | None = DIGIT_NAMES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index("digits", index, len(self.labels))
        return {"x": self.images[i], "label": self.labels[i]}

    def __repr__(self) -> str:
        return (
            f"Digits(split={self.split!r}, n={len(self)}, shape={self.data_shape}, "
            f"test_fraction={self.test_fraction})"
        )
