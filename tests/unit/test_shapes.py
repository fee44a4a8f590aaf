"""The procedural ``shapes`` dataset, its captions, and the ``shapes_checker`` metric."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import unfog
from unfog.errors import ConfigError, DataError
from unfog.testing import DatasetContract, MetricContract
from unfog_datasets.shapes import (
    COLORS,
    NUM_CLASSES,
    POSITIONS,
    SHAPES,
    ShapeObject,
    caption_of,
    object_side,
    parse_caption,
    shape_mask,
)
from unfog_metrics.shapes_checker import classify_shape


def _batch(n: int, **kwargs: Any) -> dict[str, Any]:
    ds = unfog.create("dataset", "shapes", **kwargs)
    return next(iter(DataLoader(ds, batch_size=n)))


@pytest.fixture(scope="module")
def singles() -> dict[str, Any]:
    return _batch(300)


@pytest.fixture(scope="module")
def pairs() -> dict[str, Any]:
    return _batch(300, max_objects=2)


class TestShapesContract(DatasetContract):
    key = "shapes"
    kwargs = {"max_objects": 2, "length": 10}


class TestShapesCheckerContract(MetricContract):
    key = "shapes_checker"

    def inputs(self) -> dict[str, Any]:
        batch = _batch(12, max_objects=2)
        return {"generated": batch["x"], "captions": batch["caption"]}


# --- the dataset ---------------------------------------------------------------------------


def test_items_are_deterministic_from_seed_and_index() -> None:
    a, b = unfog.create("dataset", "shapes", seed=3), unfog.create("dataset", "shapes", seed=3)
    later_first = [b[i] for i in (7, 2)]
    for item, i in zip(later_first, (7, 2)):
        torch.testing.assert_close(a[i]["x"], item["x"], rtol=0, atol=0)
        assert a[i]["caption"] == item["caption"]
    other = unfog.create("dataset", "shapes", seed=4)
    assert [a[i]["caption"] for i in range(20)] != [other[i]["caption"] for i in range(20)]


def test_metadata_and_fields() -> None:
    ds = unfog.create("dataset", "shapes", size=32, max_objects=2, length=50)
    assert len(ds) == 50 and ds.data_shape == (3, 32, 32) and ds.data_range == (-1.0, 1.0)
    assert ds.num_classes == NUM_CLASSES == len(COLORS) * len(SHAPES) == len(ds.class_names)
    item = ds[-1]
    assert set(ds.fields) == set(item)
    assert item["objects"].shape == (2, 3) and item["objects"].dtype == torch.long
    first = ShapeObject(int(item["color"]), int(item["shape"]), int(item["position"]))
    assert tuple(item["objects"][0].tolist()) == first
    assert int(item["label"]) == first.color * len(SHAPES) + first.shape
    assert ds.class_names[int(item["label"])] == f"{COLORS[first.color]} {SHAPES[first.shape]}"
    assert set(np.unique(item["x"].numpy())) <= {-1.0, 1.0}  # pure colours on black


def test_pairs_cover_same_and_different_objects_in_distinct_cells(pairs: dict[str, Any]) -> None:
    counts = pairs["count"].tolist()
    assert set(counts) == {1, 2}
    two = pairs["objects"][pairs["count"] == 2]
    assert (two[:, 0, 2] < two[:, 1, 2]).all(), "two objects share a cell or are out of reading order"
    same = (two[:, 0, :2] == two[:, 1, :2]).all(dim=1)
    assert 0.3 < float(same.float().mean()) < 0.7
    assert all(c.startswith("two ") for c, n, o in zip(pairs["caption"], counts, pairs["objects"])
               if n == 2 and o[0, 0] == o[1, 0] and o[0, 1] == o[1, 1])
    assert (pairs["objects"][pairs["count"] == 1][:, 1] == -1).all()


def test_every_attribute_value_occurs(singles: dict[str, Any]) -> None:
    assert set(singles["color"].tolist()) == set(range(len(COLORS)))
    assert set(singles["shape"].tolist()) == set(range(len(SHAPES)))
    assert set(singles["position"].tolist()) == set(range(len(POSITIONS)))


def test_a_batch_collates_captions_as_a_list_of_strings(singles: dict[str, Any]) -> None:
    assert isinstance(singles["caption"], list) and all(isinstance(c, str) for c in singles["caption"])
    assert singles["x"].shape == (300, 3, 16, 16) and singles["label"].shape == (300,)


@pytest.mark.parametrize("size", [8, 13, 16, 24, 32, 64, 128])
def test_objects_fit_every_size(size: int) -> None:
    ds = unfog.create("dataset", "shapes", size=size, max_objects=2, length=40)
    low, high = object_side(size)
    assert 2 <= low <= high < size / 3
    for i in range(len(ds)):
        assert ds[i]["x"].shape == (3, size, size)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 7}, "size must be at least 8"),
        ({"size": 129}, "size must be at most 128"),
        ({"size": 16.0}, "size must be an integer"),
        ({"max_objects": 3}, "max_objects must be 1 or 2"),
        ({"length": 0}, "length must be at least 1"),
        ({"seed": -1}, "seed must be at least 0"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        unfog.create("dataset", "shapes", **kwargs)


def test_index_out_of_range() -> None:
    with pytest.raises(IndexError, match="out of range"):
        unfog.create("dataset", "shapes", length=5)[5]


# --- captions ------------------------------------------------------------------------------


def test_captions_round_trip(pairs: dict[str, Any]) -> None:
    for caption, count, table in zip(pairs["caption"], pairs["count"], pairs["objects"]):
        objects = parse_caption(caption)
        assert objects == tuple(ShapeObject(*row) for row in table[: int(count)].tolist())
        assert caption_of(objects) == caption


@pytest.mark.parametrize(
    ("text", "objects"),
    [
        ("a red circle in the top left", [(0, 0, 0)]),
        ("a green triangle at the bottom", [(1, 2, 7)]),
        ("A Cyan Square, in the Centre.", [(5, 1, 4)]),
        ("one yellow square middle", [(3, 1, 4)]),
        ("a magenta circle on the top-right", [(4, 0, 2)]),
        ("a blue square", [(2, 1, None)]),
        ("two blue squares", [(2, 1, None), (2, 1, None)]),
        ("two red circles on the left and in the bottom right", [(0, 0, 3), (0, 0, 8)]),
        ("a red circle at the top and a blue triangle", [(0, 0, 1), (2, 2, None)]),
    ],
)
def test_parse_caption(text: str, objects: list[tuple[int, int, int | None]]) -> None:
    assert parse_caption(text) == tuple(ShapeObject(*o) for o in objects)


def test_caption_of_wording() -> None:
    assert caption_of(ShapeObject(0, 0, 0)) == "a red circle in the top left"
    assert caption_of([ShapeObject(1, 2, 7)]) == "a green triangle at the bottom"
    assert caption_of([(2, 1, None), (2, 1, None)]) == "two blue squares"
    assert caption_of([(2, 1, 3), (2, 1, 5)]) == "two blue squares on the left and on the right"
    assert caption_of([(0, 0, 4), (5, 1, 8)]) == "a red circle in the center and a cyan square in the bottom right"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a purple circle", r"unknown word 'purple'.*magenta"),
        ("a red hexagon at the top", r"unknown word 'hexagon'.*triangle"),
        ("", "expected 'a', 'an', 'one' or 'two' but found the end"),
        ("red circle", "expected 'a', 'an', 'one' or 'two' but found 'red'"),
        ("a red", "expected a shape but found the end"),
        ("two red circle", "expected a plural shape but found 'circle'"),
        ("a red circle in the", "expected a position"),
        ("two red circles at the top", "expected 'and' and the second position"),
        ("a red circle top and a blue square top", "cannot share a position"),
        ("a red circle and a red square and a red triangle", "at most 2"),
        ("a red circle blue", "expected 'and' or the end"),
    ],
)
def test_parse_caption_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        parse_caption(text)
    assert "vocabulary:" in str(info.value) and "bottom right" in str(info.value)


def test_caption_of_errors() -> None:
    with pytest.raises(ConfigError, match="1 to 2 objects"):
        caption_of([(0, 0, 0)] * 3)
    with pytest.raises(ConfigError, match="both positions or neither"):
        caption_of([(0, 0, 0), (0, 0, None)])
    with pytest.raises(ConfigError, match="not a valid object"):
        caption_of([(6, 0, 0)])


# --- the checker ---------------------------------------------------------------------------


def _check(images: torch.Tensor, **request: Any) -> dict[str, float]:
    m = unfog.create("metric", "shapes_checker")
    m.update(generated=images, **request)
    return m.compute()


@pytest.mark.parametrize("side", [5, 7, 10, 19])
def test_classify_shape_on_drawn_masks(side: int) -> None:
    assert [classify_shape(shape_mask(s, side)) for s in range(len(SHAPES))] == [0, 1, 2]
    assert classify_shape(np.ones((side, 2 * side), dtype=bool)) == -1  # a long bar is none of them


def test_checker_reads_the_dataset_back(singles: dict[str, Any], pairs: dict[str, Any]) -> None:
    # Measured: 1.0 for every attribute on the first 2,000 images at size 16 (one object and up to two).
    for batch in (singles, pairs):
        result = _check(batch["x"], captions=batch["caption"])
        assert result["n"] == 300
        for key in ("color", "shape", "position", "count", "all_correct"):
            assert result[key] >= 0.99, (key, result)
    by_label = _check(singles["x"], labels=singles["label"])
    assert by_label["all_correct"] >= 0.99 and "position" not in by_label


@pytest.mark.parametrize("size", [32, 64, 128])
def test_checker_reads_large_images_back(size: int) -> None:
    # the sizes of latent text-to-image (docs/latent.md): objects grow with the image
    ds = unfog.create("dataset", "shapes", size=size, max_objects=2, length=60)
    items = [ds[i] for i in range(len(ds))]
    result = _check(torch.stack([it["x"] for it in items]), captions=[it["caption"] for it in items])
    assert result["all_correct"] == 1.0, result


def test_checker_tolerates_mild_noise(pairs: dict[str, Any]) -> None:
    noisy = pairs["x"] + 0.2 * torch.randn(pairs["x"].shape, generator=torch.Generator().manual_seed(0))
    assert _check(noisy.clamp(-1, 1), captions=pairs["caption"])["all_correct"] >= 0.95


def test_checker_fails_noise_blank_and_wrong_requests(singles: dict[str, Any], pairs: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(pairs["x"].shape, generator=g).clamp(-1, 1)
    assert _check(noise, captions=pairs["caption"])["all_correct"] <= 0.05
    assert _check(noise, labels=singles["label"])["all_correct"] <= 0.05
    blank = _check(-torch.ones_like(singles["x"]), captions=singles["caption"])
    assert blank["count"] == 0 and blank["all_correct"] == 0
    wrong = _check(singles["x"], labels=(singles["label"] + 1) % NUM_CLASSES)
    assert wrong["all_correct"] == 0 and wrong["count"] == 1
    shuffled = [pairs["caption"][i] for i in torch.randperm(300, generator=g)]
    assert _check(pairs["x"], captions=shuffled)["all_correct"] <= 0.1


def test_checker_scores_attributes_separately() -> None:
    batch = _batch(1)
    x = batch["x"]
    (want,) = parse_caption(batch["caption"][0])
    moved = caption_of(ShapeObject(want.color, want.shape, (want.position + 1) % 9))
    result = _check(x, captions=[moved])
    assert (result["color"], result["shape"], result["position"], result["all_correct"]) == (1, 1, 0, 0)


def test_checker_errors(singles: dict[str, Any]) -> None:
    x = singles["x"][:4]
    with pytest.raises(ConfigError, match="neither labels nor captions"):
        _check(x)
    with pytest.raises(DataError, match="4 generated images but 3 labels"):
        _check(x, labels=singles["label"][:3])
    with pytest.raises(DataError, match=r"labels must lie in 0..17"):
        _check(x, labels=torch.tensor([0, 1, 2, 18]))
    with pytest.raises(DataError, match="B×3×S×S"):
        _check(x[:, :1], labels=singles["label"][:4])
    with pytest.raises(DataError, match="list of strings"):
        _check(x[:1], captions="a red circle")
    with pytest.raises(ConfigError, match="unknown word 'octagon'"):
        _check(x[:1], captions=["a red octagon"])
    with pytest.raises(DataError, match="no images to score"):
        unfog.create("metric", "shapes_checker").compute()
    with pytest.raises(ConfigError, match="threshold"):
        unfog.create("metric", "shapes_checker", threshold=1.0)
