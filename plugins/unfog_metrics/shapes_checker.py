"""Prompt adherence of generated ``shapes`` images: colour, shape and position read from pixels."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unfog import register
from unfog.errors import ConfigError, DataError
from unfog_datasets.shapes import (
    MIN_SIZE,
    NUM_CLASSES,
    PALETTE,
    SHAPES,
    ShapeObject,
    color_shape_of,
    object_side,
    parse_caption,
)
from unfog_metrics._common import requested_labels

# (fill ratio of the bounding box, asymmetry) of the ideal shapes: a disc fills π/4 of its box,
# a square all of it, a triangle half, with three quarters of its area in the wide half
# (asymmetry = (wide half - narrow half) / area = 1/2).
SHAPE_PROTOTYPES: np.ndarray = np.array([[np.pi / 4, 0.0], [1.0, 0.0], [0.5, 0.5]])
# Bounding boxes more elongated than this are none of the shapes (all are as wide as tall),
# and so are blobs wider or taller than MAX_GROWTH times the largest object the dataset draws.
MAX_ASPECT = 1.5
MAX_GROWTH = 1.5
UNKNOWN = -1


def _asymmetry(mask: np.ndarray) -> float:
    """|wide half - narrow half| / area along the more lopsided axis (a triangle: about 1/2)."""
    area = mask.sum()
    best = 0.0
    for profile in (mask.sum(axis=1), mask.sum(axis=0)):
        n = len(profile)
        weights = np.clip(np.arange(n) + 0.5 - n / 2.0, -0.5, 0.5) * 2.0  # -1 first half, +1 second, 0 middle
        best = max(best, abs(float((weights * profile).sum())) / float(area))
    return best


def classify_shape(mask: np.ndarray, max_side: float = float("inf")) -> int:
    """The index into SHAPES of the prototype nearest to a blob's (fill ratio, asymmetry), or -1
    when its bounding box is too elongated or larger than ``max_side`` to be any of them."""
    h, w = mask.shape
    if max(h, w) > MAX_ASPECT * min(h, w) or max(h, w) > max_side:
        return UNKNOWN
    features = np.array([mask.sum() / float(h * w), _asymmetry(mask)])
    return int(np.argmin(((SHAPE_PROTOTYPES - features) ** 2).sum(axis=1)))


def read_objects(image: np.ndarray, threshold: float = 0.0, min_area: int | None = None) -> list[ShapeObject]:
    """The objects found in one 3×S×S image in [-1, 1], largest first.

    A pixel is foreground when its brightest channel exceeds ``threshold``; 8-connected blobs
    of at least ``min_area`` pixels are objects. Colour is the palette colour nearest the blob's
    mean pixel, shape is :func:`classify_shape` of the blob within its bounding box, position
    is the 3×3 grid cell of the bounding box's centre. Blobs far larger than the dataset's
    objects, or elongated, get the shape -1 (none).
    """
    from scipy import ndimage

    size = image.shape[-1]
    smallest, largest = object_side(size)
    if min_area is None:
        min_area = max(1, round(0.25 * smallest**2))
    foreground = image.max(axis=0) > threshold
    labelled, n = ndimage.label(foreground, structure=np.ones((3, 3), dtype=bool))
    found: list[tuple[int, ShapeObject]] = []
    for k, box in enumerate(ndimage.find_objects(labelled), start=1):
        if box is None:
            continue
        mask = labelled[box] == k
        area = int(mask.sum())
        if area < min_area:
            continue
        mean = image[:, box[0], box[1]][:, mask].mean(axis=1)
        color = int(np.argmin(((PALETTE - mean) ** 2).sum(axis=1)))
        centre = [(s.start + s.stop) / 2.0 for s in box]  # row, column, in pixel-edge coordinates
        row, col = (min(2, max(0, int(c * 3 // size))) for c in centre)
        found.append((area, ShapeObject(color, classify_shape(mask, MAX_GROWTH * largest), 3 * row + col)))
    return [o for _, o in sorted(found, key=lambda f: -f[0])]


def _agreement(want: ShapeObject, got: ShapeObject) -> tuple[bool, bool, bool | None]:
    position = None if want.position is None else want.position == got.position
    return want.color == got.color, want.shape == got.shape, position


def _score(want: Sequence[ShapeObject], found: Sequence[ShapeObject]) -> list[tuple[bool, bool, bool | None]]:
    """Per requested object, which attributes the best one-to-one matching of found objects gets right."""
    missing = [(False, False, None if w.position is None else False) for w in want]
    best, best_hits = missing, -1
    candidates = list(found[: len(want) + 2])  # the largest blobs; more cannot be matched anyway
    for chosen in itertools.permutations(candidates, min(len(want), len(candidates))):
        agree = [_agreement(w, g) for w, g in zip(want, chosen)] + missing[len(chosen):]
        hits = sum(sum(bool(a) for a in row) for row in agree)
        if hits > best_hits:
            best, best_hits = agree, hits
    return best


@register("metric", "shapes_checker")
class ShapesChecker:
    """Share of generated ``shapes`` images whose colour, shape, position and count match the request.

    Reads the objects back from the pixels (:func:`read_objects`: brightness threshold,
    8-connected blobs, nearest palette colour, shape from the fill ratio and asymmetry of the
    blob in its bounding box, position from its centre on the 3×3 grid), matches them one to
    one with the requested objects, and scores each attribute. The request is either
    ``labels`` (class ids of the ``shapes`` dataset: one object of that colour and shape,
    anywhere) or ``captions`` (one per image, read by ``parse_caption``; positions left out
    are not scored); captions take precedence when both are given. ``real`` is ignored.

    On the dataset's own images at size 16 it reads back 100 % of the attributes (measured on
    the first 2,000 images with one object and 2,000 with up to two; see
    ``tests/unit/test_shapes.py``), so the scores of a generator are not limited by the checker.
    Images smaller than 16×16 are too coarse for reliable shapes.

    ``compute()`` gives ``color``, ``shape`` and ``position`` (shares of requested objects
    with that attribute right; ``position`` only if some request named a position),
    ``count`` (share of images with as many objects as requested), ``all_correct`` (share of
    images with everything right) and ``n`` (the number of images).

    Args:
        threshold: a pixel is part of an object when its brightest channel exceeds this.
        min_area: the smallest blob, in pixels, that counts as an object (None: a quarter of
            the smallest object's box at that image size).
    """

    def __init__(self, threshold: float = 0.0, min_area: int | None = None) -> None:
        if not -1.0 < threshold < 1.0:
            raise ConfigError(f"shapes_checker: threshold must lie strictly between -1 and 1; got {threshold}.")
        if min_area is not None and (isinstance(min_area, bool) or not isinstance(min_area, int) or min_area < 1):
            raise ConfigError(f"shapes_checker: min_area must be a positive integer or None; got {min_area!r}.")
        self.threshold = float(threshold)
        self.min_area = min_area
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self._objects: list[tuple[bool, bool, bool | None]] = []
        self._count: list[bool] = []
        self._all: list[bool] = []

    def read(self, images: Tensor) -> list[list[ShapeObject]]:
        """The objects found in each image (B×3×S×S in [-1, 1]); non-finite images hold none."""
        x = self._check_images(images)
        finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
        return [read_objects(img, self.threshold, self.min_area) if ok else [] for img, ok in zip(x, finite)]

    def update(
        self,
        *,
        generated: Tensor,
        labels: Tensor | None = None,
        real: Tensor | None = None,
        captions: Sequence[str] | None = None,
    ) -> None:
        """Read ``generated`` and compare with the ``captions`` or ``labels`` they were generated for."""
        requests = self._requests(labels, captions)
        if len(generated) != len(requests):
            raise DataError(
                f"shapes_checker: got {len(generated)} generated images but {len(requests)} "
                f"{'captions' if captions is not None else 'labels'}; pass one per image."
            )
        for want, found in zip(requests, self.read(generated)):
            agree = _score(want, found)
            self._objects.extend(agree)
            self._count.append(len(found) == len(want))
            self._all.append(self._count[-1] and all(c and s and p is not False for c, s, p in agree))

    def compute(self) -> dict[str, float]:
        """``color``, ``shape``, ``position``, ``count``, ``all_correct`` and ``n`` since the last reset."""
        if not self._all:
            raise DataError("shapes_checker: no images to score; call update() with images first.")
        rows = np.array([(c, s) for c, s, _ in self._objects], dtype=float)
        result = {"color": float(rows[:, 0].mean()), "shape": float(rows[:, 1].mean())}
        positions = [p for _, _, p in self._objects if p is not None]
        if positions:
            result["position"] = float(np.mean(positions))
        result.update(count=float(np.mean(self._count)), all_correct=float(np.mean(self._all)),
                      n=float(len(self._all)))
        return result

    def _requests(self, labels: Any, captions: Sequence[str] | None) -> list[tuple[ShapeObject, ...]]:
        if captions is not None:
            if isinstance(captions, str):
                raise DataError("shapes_checker: captions must be a list of strings, one per image; got one string.")
            return [parse_caption(c) for c in captions]
        if labels is None:
            raise ConfigError(
                "shapes_checker: needs what each image was generated for, but neither labels nor captions "
                "were given. Use it with a model conditioned on the shapes dataset's label or caption."
            )
        labels_t = requested_labels("shapes_checker", labels, NUM_CLASSES, classes=f" (colour × {len(SHAPES)} + shape)")
        return [(ShapeObject(*color_shape_of(int(y))),) for y in labels_t]

    def _check_images(self, images: Tensor) -> np.ndarray:
        x = torch.as_tensor(images).detach().to("cpu", torch.float32)
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3] or x.shape[2] < MIN_SIZE:
            raise DataError(
                f"shapes_checker: generated images must be B×3×S×S with S ≥ {MIN_SIZE} (as from the shapes "
                f"dataset); got shape {tuple(x.shape)}."
            )
        return x.numpy()

    def __repr__(self) -> str:
        return f"ShapesChecker(threshold={self.threshold}, min_area={self.min_area})"

