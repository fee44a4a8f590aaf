"""Procedurally drawn coloured shapes with captions, for text- and attribute-conditional models.

Every image is generated on the fly from ``(seed, index)``: no files, no downloads. The
vocabularies below, :func:`caption_of` and :func:`parse_caption` are shared with the
``shapes_checker`` metric, which reads colour, shape and position back from pixels.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from unfog import register
from unfog.errors import ConfigError
from unfog_datasets._common import IMAGE_RANGE, check_index, check_int

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
# Pure RGB colours in [-1, 1], one row per entry of COLORS; the background is black (-1, -1, -1).
PALETTE: np.ndarray = np.array(
    [[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]], dtype=np.float32
)
PALETTE.setflags(write=False)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SHAPE_PLURALS: tuple[str, ...] = ("circles", "squares", "triangles")
# The cells of a 3×3 grid in reading order: position = 3·row + column.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)
CENTER = POSITIONS.index("center")
COUNT_WORDS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2}
PREPOSITIONS: tuple[str, ...] = ("in", "at", "on")
POSITION_ALIASES: dict[str, str] = {"centre": "center", "middle": "center"}
FILLER_WORDS: tuple[str, ...] = ("the", "and")
VOCABULARY: tuple[str, ...] = tuple(sorted(
    set(COUNT_WORDS) | set(COLORS) | set(SHAPES) | set(SHAPE_PLURALS) | set(PREPOSITIONS) | set(FILLER_WORDS)
    | set(POSITION_ALIASES) | {w for p in POSITIONS for w in p.split()}
))
NUM_CLASSES = len(COLORS) * len(SHAPES)
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
MIN_SIZE, MAX_SIZE = 8, 128
MAX_OBJECTS = 2
# Of the two-object images, this share shows two of the same ("two blue squares").
SAME_PAIR_PROBABILITY = 0.5


class ShapeObject(NamedTuple):
    """One object of a scene as indices into COLORS, SHAPES and POSITIONS (``None``: unspecified)."""

    color: int
    shape: int
    position: int | None = None


def label_of(color: int, shape: int) -> int:
    """The class id combining a colour and a shape: ``color · len(SHAPES) + shape``."""
    return int(color) * len(SHAPES) + int(shape)


def color_shape_of(label: int) -> tuple[int, int]:
    """The (colour, shape) indices of a class id from :func:`label_of`."""
    return divmod(int(label), len(SHAPES))


def _position_phrase(position: int) -> str:
    name = POSITIONS[position]
    preposition = "at" if name in ("top", "bottom") else "on" if name in ("left", "right") else "in"
    return f"{preposition} the {name}"


def _as_objects(attrs: ShapeObject | Sequence[ShapeObject]) -> tuple[ShapeObject, ...]:
    objects = (attrs,) if isinstance(attrs, ShapeObject) else tuple(ShapeObject(*o) for o in attrs)
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise ConfigError(f"shapes: a caption describes 1 to {MAX_OBJECTS} objects; got {len(objects)}.")
    for o in objects:
        if not (0 <= o.color < len(COLORS) and 0 <= o.shape < len(SHAPES)) or not (
            o.position is None or 0 <= o.position < len(POSITIONS)
        ):
            raise ConfigError(
                f"shapes: {o} is not a valid object; colour is 0..{len(COLORS) - 1}, shape "
                f"0..{len(SHAPES) - 1}, position 0..{len(POSITIONS) - 1} or None."
            )
    return objects


def caption_of(attrs: ShapeObject | Sequence[ShapeObject]) -> str:
    """The caption of one object or a pair, e.g. ``"a red circle in the top left"``,
    ``"two blue squares on the left and at the bottom"`` or
    ``"a green triangle at the top and a cyan circle in the center"``.

    Positions that are ``None`` are left out (``"two blue squares"``).
    """
    objects = _as_objects(attrs)
    first = objects[0]
    if len(objects) == 2 and objects[1][:2] == first[:2]:
        text = f"two {COLORS[first.color]} {SHAPE_PLURALS[first.shape]}"
        positions = [o.position for o in objects]
        if positions.count(None) == 1:
            raise ConfigError(
                f"shapes: two {COLORS[first.color]} {SHAPE_PLURALS[first.shape]} need both positions or "
                f"neither; got {positions}."
            )
        if positions[0] is not None:
            text += f" {_position_phrase(positions[0])} and {_position_phrase(positions[1])}"
        return text
    parts = []
    for o in objects:
        part = f"{'an' if COLORS[o.color][0] in 'aeiou' else 'a'} {COLORS[o.color]} {SHAPES[o.shape]}"
        parts.append(part if o.position is None else f"{part} {_position_phrase(o.position)}")
    return " and ".join(parts)


class _Words:
    """A cursor over a caption's words that raises helpful errors."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.words = re.findall(r"[a-z]+", text.lower())
        for w in self.words:
            if w not in VOCABULARY:
                self.fail(f"unknown word {w!r}")
        self.i = 0

    def peek(self) -> str | None:
        return self.words[self.i] if self.i < len(self.words) else None

    def take(self) -> str | None:
        w = self.peek()
        self.i += 1
        return w

    def fail(self, what: str) -> None:
        raise ConfigError(
            f"shapes: cannot read the caption {self.text!r}: {what}. Captions look like 'a red circle in "
            f"the top left', 'two blue squares' or 'a green triangle at the bottom and a cyan square'. "
            f"Colours: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}; positions: {', '.join(POSITIONS)}; "
            f"vocabulary: {' '.join(VOCABULARY)}."
        )

    def expect(self, choices: Sequence[str], what: str) -> str:
        w = self.take()
        if w not in choices:
            self.fail(f"expected {what} but found {'the end' if w is None else repr(w)}")
        return w  # type: ignore[return-value]


def _parse_position(words: _Words) -> int | None:
    """An optional position phrase: ``[in|at|on] [the] top left`` (None when none follows)."""
    start = words.i
    if words.peek() in PREPOSITIONS:
        words.take()
    if words.peek() == "the":
        words.take()
    w = words.peek()
    w = POSITION_ALIASES.get(w, w) if w is not None else None
    if w not in ("top", "bottom", "left", "right", "center"):
        if words.i != start:
            words.fail(f"expected a position ({', '.join(POSITIONS)}) but found "
                       f"{'the end' if w is None else repr(w)}")
        return None
    words.take()
    if w in ("top", "bottom") and words.peek() in ("left", "right"):
        w = f"{w} {words.take()}"
    return POSITIONS.index(w)


def parse_caption(text: str) -> tuple[ShapeObject, ...]:
    """The objects a caption asks for: the inverse of :func:`caption_of`.

    Reads ``"a green triangle at the bottom"``, ``"two blue squares"``, ``"a red circle in the
    top left and a cyan square"``; "centre" and "middle" mean center, and punctuation and case
    are ignored. Positions not given are ``None``.

    Raises:
        ConfigError: naming the unknown or misplaced word and listing the vocabulary.
    """
    if not isinstance(text, str):
        raise ConfigError(f"shapes: a caption must be a string; got {text!r} ({type(text).__name__}).")
    words = _Words(text)
    objects: list[ShapeObject] = []
    while True:
        count = COUNT_WORDS[words.expect(tuple(COUNT_WORDS), "'a', 'an', 'one' or 'two'")]
        color = COLORS.index(words.expect(COLORS, "a colour"))
        nouns = SHAPES if count == 1 else SHAPE_PLURALS
        shape = nouns.index(words.expect(nouns, "a shape" if count == 1 else "a plural shape"))
        positions = [_parse_position(words)]
        if count == 2:
            if positions[0] is not None:
                words.expect(("and",), "'and' and the second position")
                second = _parse_position(words)
                if second is None:
                    words.fail("expected the second object's position after 'and'")
                positions.append(second)
            else:
                positions.append(None)
        objects.extend(ShapeObject(color, shape, p) for p in positions)
        if words.peek() is None:
            break
        words.expect(("and",), "'and' or the end of the caption")
    if len(objects) > MAX_OBJECTS:
        words.fail(f"it describes {len(objects)} objects but a scene holds at most {MAX_OBJECTS}")
    placed = [o.position for o in objects if o.position is not None]
    if len(placed) != len(set(placed)):
        words.fail("two objects cannot share a position")
    return tuple(objects)


def object_side(size: int) -> tuple[int, int]:
    """The smallest and largest side, in pixels, of an object's square box in a size×size image."""
    largest = max(2, round(0.3 * size))
    return (largest if size < 24 else round(0.22 * size)), largest


@functools.lru_cache(maxsize=256)
def shape_mask(shape: int, side: int) -> np.ndarray:
    """The side×side boolean mask of a filled circle, square or upward triangle (pixel centres inside)."""
    centres = np.arange(side) + 0.5
    v, u = np.meshgrid(centres, centres, indexing="ij")  # v: row, u: column
    c = side / 2.0
    if SHAPES[shape] == "circle":
        mask = (u - c) ** 2 + (v - c) ** 2 <= c * c
    elif SHAPES[shape] == "square":
        mask = np.ones((side, side), dtype=bool)
    else:  # apex at the top centre, base along the bottom; every row holds at least one pixel
        mask = np.abs(u - c) <= np.maximum(0.5, v / 2.0)
    mask.setflags(write=False)
    return mask


def _starts(cell: int, side: int, size: int) -> np.ndarray:
    """Box starts along one axis that keep the box centre at least half a pixel inside ``cell``."""
    lo, hi = cell * size / 3.0, (cell + 1) * size / 3.0
    starts = np.arange(0, size - side + 1)
    centre = starts + side / 2.0
    return starts[(centre >= lo + 0.5) & (centre <= hi - 0.5)]


def _apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Whether two boxes (row, column, side) leave at least one pixel between them."""
    (ra, ca, sa), (rb, cb, sb) = a, b
    return ra + sa < rb or rb + sb < ra or ca + sa < cb or cb + sb < ca


def render(objects: Sequence[ShapeObject], size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``objects`` (with positions) on black as a 3×size×size float32 array in [-1, 1].

    Box sides and offsets within their grid cells are drawn from ``rng``; objects never touch.
    """
    low, high = object_side(size)
    if any(o.position is None for o in objects):
        raise ConfigError(f"shapes: cannot draw {list(objects)}: every object needs a position.")
    for _ in range(1000):  # redraw the whole layout until no two boxes touch
        boxes = []
        for o in objects:
            row, col = divmod(o.position, 3)  # type: ignore[arg-type]
            side = int(rng.integers(low, high + 1))
            boxes.append((int(rng.choice(_starts(row, side, size))), int(rng.choice(_starts(col, side, size))), side))
        if all(_apart(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]):
            break
    else:  # pragma: no cover - the cells leave room at every allowed size
        raise RuntimeError(f"shapes: could not place {list(objects)} apart in a {size}×{size} image.")
    image = np.full((3, size, size), -1.0, dtype=np.float32)
    for o, (r, c, side) in zip(objects, boxes):
        mask = shape_mask(o.shape, side)
        image[:, r:r + side, c:c + side][:, mask] = PALETTE[o.color][:, None]
    return image


def sample_objects(rng: np.random.Generator, max_objects: int) -> tuple[ShapeObject, ...]:
    """A random scene of 1..max_objects objects in distinct cells, in reading order."""
    count = int(rng.integers(1, max_objects + 1))
    positions = sorted(int(p) for p in rng.choice(len(POSITIONS), size=count, replace=False))
    color, shape = int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES)))
    objects = [ShapeObject(color, shape, positions[0])]
    if count == 2:
        if rng.random() >= SAME_PAIR_PROBABILITY:  # a different pair: another colour, shape or both
            other = int(rng.integers(1, NUM_CLASSES))
            color, shape = color_shape_of((label_of(color, shape) + other) % NUM_CLASSES)
        objects.append(ShapeObject(color, shape, positions[1]))
    return tuple(objects)


@register("dataset", "shapes")
class Shapes(Dataset):
    """Coloured circles, squares and triangles on black with captions, drawn on the fly.

    Each image (3×size×size in [-1, 1]) holds 1 to ``max_objects`` filled shapes in six pure
    colours, each in its own cell of a 3×3 grid; two objects are two of the same ("two blue
    squares ...") or different ones, and never touch. Items are dicts with

    - ``x``: the image; ``caption``: e.g. ``"a red circle in the top left"``;
    - ``label``: colour × shape of the first object as one class id (``num_classes`` = 18),
      for the ``class_label`` conditioner;
    - ``color``, ``shape``, ``position``: the first object's indices into ``COLORS``,
      ``SHAPES``, ``POSITIONS``; ``count``: the number of objects;
    - ``objects``: a max_objects×3 int64 tensor of (colour, shape, position) rows in reading
      order, padded with -1.

    Item ``i`` depends only on (``seed``, ``i``), so nothing is stored. At ``size`` 16 and
    above the ``shapes_checker`` metric reads every attribute back from the pixels; 8×8
    images are for quick smoke runs only.

    Args:
        size: image side in pixels, 8 to 128 (16, 32, 64 and 128 are the usual ones).
        max_objects: 1 or 2 objects per image (with 2, the count is 1 or 2 at random).
        length: number of items.
        seed: seed of the whole dataset (a non-negative integer).
    """

    def __init__(self, size: int = 16, max_objects: int = 1, length: int = 20000, seed: int = 0) -> None:
        check_int("shapes", "size", size, minimum=MIN_SIZE)
        if size > MAX_SIZE:
            raise ConfigError(f"shapes: size must be at most {MAX_SIZE}; got {size}.")
        check_int("shapes", "max_objects", max_objects, minimum=1)
        if max_objects > MAX_OBJECTS:
            raise ConfigError(f"shapes: max_objects must be 1 or {MAX_OBJECTS}; got {max_objects}.")
        check_int("shapes", "length", length, minimum=1)
        check_int("shapes", "seed", seed, minimum=0)
        self.size, self.max_objects, self.length, self.seed = size, max_objects, length, seed
        self.data_shape: tuple[int, ...] = (3, size, size)
        self.data_range: tuple[float, float] | None = IMAGE_RANGE
        self.fields: tuple[str, ...] = ("x", "caption", "label", "color", "shape", "position", "count", "objects")
        self.num_classes: int | None = NUM_CLASSES
        self.class_names: tuple[str, ...] | None = CLASS_NAMES

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[ShapeObject, ...]:
        """The objects of item ``index`` (cheap: nothing is drawn)."""
        return sample_objects(self._rng(check_index("shapes", index, self.length)), self.max_objects)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index("shapes", index, self.length)
        rng = self._rng(i)
        objects = sample_objects(rng, self.max_objects)
        table = torch.full((self.max_objects, 3), -1, dtype=torch.long)
        table[: len(objects)] = torch.tensor([tuple(o) for o in objects], dtype=torch.long)
        first = objects[0]
        return {
            "x": torch.from_numpy(render(objects, self.size, rng)),
            "caption": caption_of(objects),
            "label": torch.tensor(label_of(first.color, first.shape)),
            "color": torch.tensor(first.color),
            "shape": torch.tensor(first.shape),
            "position": torch.tensor(first.position),
            "count": torch.tensor(len(objects)),
            "objects": table,
        }

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index])

    def __repr__(self) -> str:
        return (
            f"Shapes(size={self.size}, max_objects={self.max_objects}, length={self.length}, seed={self.seed})"
        )
