"""First-party datasets: metadata, items, splits, error paths (all offline)."""

from __future__ import annotations

import collections
import pickle
import struct
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import unfog
from unfog.errors import ConfigError, DataError
from unfog.protocols import DatasetLike
from unfog_datasets.digits import digits_split
from unfog_datasets.toy2d import TOY2D_NAMES, sample_toy2d


def check_item_matches_metadata(ds, index: int = 0) -> dict:
    """An item's keys, dtypes, shape and range agree with the dataset's metadata."""
    assert isinstance(ds, DatasetLike)
    assert isinstance(ds.data_shape, tuple) and all(isinstance(d, int) for d in ds.data_shape)
    item = ds[index]
    assert isinstance(item, dict)
    assert tuple(item) == tuple(ds.fields)
    x = item["x"]
    assert x.dtype == torch.float32
    assert tuple(x.shape) == ds.data_shape
    assert torch.isfinite(x).all()
    if ds.data_range is not None:
        lo, hi = ds.data_range
        assert float(x.min()) >= lo and float(x.max()) <= hi
    if "label" in ds.fields:
        label = item["label"]
        assert label.dtype == torch.long and label.ndim == 0
        assert 0 <= int(label) < ds.num_classes
        assert ds.class_names is None or len(ds.class_names) == ds.num_classes
    else:
        assert ds.num_classes is None
    return item


# --------------------------------------------------------------------------------------- toy2d


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_toy2d_builds_and_matches_metadata(name):
    ds = unfog.create("dataset", "toy2d", name=name, size=500, seed=3)
    assert len(ds) == 500
    assert ds.data_shape == (2,) and ds.data_range is None
    assert ds.fields == ("x",) and ds.num_classes is None
    check_item_matches_metadata(ds, 7)
    pts = ds.points
    assert pts.shape == (500, 2) and pts.dtype == torch.float32
    assert float(pts.abs().max()) < 4.0
    assert 0.5 < float(pts.std(dim=0).mean()) < 2.0


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_toy2d_is_deterministic_by_seed(name):
    a = sample_toy2d(name, 200, seed=1)
    assert torch.equal(a, sample_toy2d(name, 200, seed=1))
    assert not torch.equal(a, sample_toy2d(name, 200, seed=2))
    ds = unfog.create("dataset", "toy2d", name=name, size=200, seed=1)
    assert torch.equal(ds.points, a)
    assert torch.equal(ds[-1]["x"], a[-1])


def test_toy2d_shapes_differ():
    # Crude structural checks that each generator draws its own shape.
    moons = sample_toy2d("two_moons", 4000, 0)
    assert float(moons[:, 0].std()) > 1.3 * float(moons[:, 1].std())  # wider than tall
    gauss = sample_toy2d("eight_gaussians", 4000, 0)
    radius = gauss.norm(dim=1)
    assert 1.5 < float(radius.median()) < 2.5 and float((radius < 1.0).float().mean()) < 0.01
    board = sample_toy2d("checkerboard", 4000, 0)
    cells = torch.floor(board / 1.5).long()  # 4×4 cells of side 1.5 on [-3, 3]²
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()  # only half of the cells are filled
    roll = sample_toy2d("swiss_roll", 4000, 0)
    assert float(roll.norm(dim=1).min()) > 0.4  # a spiral that avoids the centre


def test_toy2d_rejects_bad_settings():
    with pytest.raises(ConfigError, match="unknown name"):
        unfog.create("dataset", "toy2d", name="spiral")
    with pytest.raises(ConfigError, match="size"):
        unfog.create("dataset", "toy2d", size=0)
    with pytest.raises(IndexError):
        unfog.create("dataset", "toy2d", size=3)[3]


# -------------------------------------------------------------------------------------- digits


def test_digits_builds_and_matches_metadata():
    ds = unfog.create("dataset", "digits")
    assert ds.data_shape == (1, 8, 8) and ds.data_range == (-1.0, 1.0)
    assert ds.fields == ("x", "label") and ds.num_classes == 10
    assert ds.class_names == tuple("0123456789")
    check_item_matches_metadata(ds, 5)
    assert float(ds.images.min()) == -1.0 and float(ds.images.max()) == 1.0
    batch = next(iter(DataLoader(ds, batch_size=16)))
    assert batch["x"].shape == (16, 1, 8, 8) and batch["label"].shape == (16,)


def test_digits_split_is_a_fixed_stratified_partition():
    x_train, y_train = digits_split("train")
    x_test, y_test = digits_split("test")
    x_all, y_all = digits_split("all")
    assert len(y_all) == 1797
    assert (len(y_train), len(y_test)) == (1437, 360)
    assert len(unfog.create("dataset", "digits", split="test")) == 360

    def rows(x, y):
        return collections.Counter((xi.numpy().tobytes(), int(yi)) for xi, yi in zip(x, y, strict=True))

    # train and test together are exactly all images (a partition, nothing shared or lost)
    assert rows(x_train, y_train) + rows(x_test, y_test) == rows(x_all, y_all)
    # stratified: every class keeps its share in the test split
    all_counts = torch.bincount(y_all, minlength=10)
    test_counts = torch.bincount(y_test, minlength=10)
    assert torch.all((test_counts - 0.2 * all_counts).abs() <= 1.0)
    # fixed: the same split every time
    assert torch.equal(digits_split("test")[1], y_test)
    assert torch.equal(digits_split("test")[0], x_test)


def test_digits_upscale_and_bad_settings():
    small = unfog.create("dataset", "digits", split="test")
    big = unfog.create("dataset", "digits", split="test", upscale=2)
    assert big.data_shape == (1, 16, 16)
    check_item_matches_metadata(big)
    expected = small[0]["x"].repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    assert torch.equal(big[0]["x"], expected)
    smooth = unfog.create("dataset", "digits", split="test", upscale=3, upscale_mode="bilinear")
    check_item_matches_metadata(smooth)
    assert smooth.data_shape == (1, 24, 24)
    with pytest.raises(ConfigError, match="test_fraction"):
        unfog.create("dataset", "digits", test_fraction=1.5)
    with pytest.raises(ConfigError, match="split"):
        unfog.create("dataset", "digits", split="val")
    with pytest.raises(ConfigError, match="upscale"):
        unfog.create("dataset", "digits", upscale=0)


# -------------------------------------------------------------------------------- image_folder


def write_png(path: Path, size=(12, 10), color=(200, 30, 30), mode="RGB") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def test_image_folder_labelled_by_subfolders(tmp_path):
    for cls, n in (("dogs", 2), ("cats", 3)):
        for i in range(n):
            write_png(tmp_path / cls / f"{i}.png")
    write_png(tmp_path / "cats" / "deeper" / "UPPER.PNG")  # recursive, any letter case
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    write_png(tmp_path / "cats" / "._hidden.png")  # hidden: left out
    ds = unfog.create("dataset", "image_folder", root=str(tmp_path), size=16)
    assert len(ds) == 6
    assert ds.class_names == ("cats", "dogs") and ds.num_classes == 2
    assert ds.fields == ("x", "label") and ds.data_shape == (3, 16, 16)
    labels = [int(ds[i]["label"]) for i in range(len(ds))]
    assert sorted(labels) == [0, 0, 0, 0, 1, 1]
    for i in range(len(ds)):
        check_item_matches_metadata(ds, i)
    x = ds[0]["x"]
    assert torch.allclose(x[:, 0, 0], torch.tensor([200, 30, 30]) / 127.5 - 1, atol=1e-6)
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=True)))
    assert batch["x"].shape == (4, 3, 16, 16) and batch["label"].dtype == torch.long


def test_image_folder_unlabelled_flat_or_mixed(tmp_path):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.jpg", color=(10, 20, 30))
    write_png(tmp_path / "sub" / "c.bmp")
    ds = unfog.create("dataset", "image_folder", root=str(tmp_path), size=8, channels=1)
    assert len(ds) == 3
    assert ds.fields == ("x",) and ds.num_classes is None and ds.class_names is None
    assert ds.data_shape == (1, 8, 8)
    for i in range(3):
        check_item_matches_metadata(ds, i)


def test_image_folder_resizes_shorter_side_and_centre_crops(tmp_path):
    from PIL import Image

    # 50×10 image: red | green (columns 15..34) | blue. Shorter side 10 → 5 halves the width to
    # 25; the centre 5×5 crop covers original columns 20..29, inside the green band.
    img = Image.new("RGB", (50, 10), (255, 0, 0))
    img.paste((0, 255, 0), (15, 0, 35, 10))
    img.paste((0, 0, 255), (35, 0, 50, 10))
    img.save(tmp_path / "wide.png")
    ds = unfog.create("dataset", "image_folder", root=str(tmp_path), size=5)
    x = ds[0]["x"]
    assert x.shape == (3, 5, 5)
    assert torch.allclose(x[1], torch.ones(5, 5), atol=0.05)
    assert torch.allclose(x[[0, 2]], -torch.ones(2, 5, 5), atol=0.05)
    # a tall image is upscaled (shorter side 6 → 12) and cropped vertically
    (tmp_path / "wide.png").unlink()
    write_png(tmp_path / "tall.png", size=(6, 30))
    x = unfog.create("dataset", "image_folder", root=str(tmp_path), size=12)[0]["x"]
    assert x.shape == (3, 12, 12)


def test_image_folder_corrupt_file_fails_with_its_path(tmp_path):
    write_png(tmp_path / "a.png")
    bad = tmp_path / "x.png"
    bad.write_bytes(b"this is not a png at all" * 10)
    ds = unfog.create("dataset", "image_folder", root=str(tmp_path), size=8)
    assert len(ds) == 2
    check_item_matches_metadata(ds, 0)
    with pytest.raises(DataError) as info:
        ds[1]
    msg = str(info.value)
    assert str(bad) in msg and "dataset.skip_bad_files=true" in msg
    assert "UnidentifiedImageError" in msg


def test_image_folder_skips_and_counts_bad_files(tmp_path):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png")
    (tmp_path / "x.png").write_bytes(b"garbage" * 20)
    good_png = (tmp_path / "a.png").read_bytes()
    (tmp_path / "y.png").write_bytes(good_png[: len(good_png) // 2])  # truncated
    with pytest.warns(RuntimeWarning, match="skipped 2 of 4") as record:
        ds = unfog.create("dataset", "image_folder", root=str(tmp_path), size=8, skip_bad_files=True)
    assert "x.png" in str(record[0].message)
    assert len(ds) == 2 and len(ds.skipped) == 2
    assert str(tmp_path / "x.png") in ds.skipped[0] and str(tmp_path / "y.png") in ds.skipped[1]
    for i in range(len(ds)):
        check_item_matches_metadata(ds, i)


def test_image_folder_no_warning_when_all_files_are_good(tmp_path):
    write_png(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = unfog.create("dataset", "image_folder", root=str(tmp_path), skip_bad_files=True)
    assert ds.skipped == []


def test_image_folder_missing_root_empty_root_and_bad_settings(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as info:
        unfog.create("dataset", "image_folder", root=str(missing))
    assert str(missing) in str(info.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="no image files found") as info:
        unfog.create("dataset", "image_folder", root=str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(info.value) and ".png" in str(info.value)
    write_png(tmp_path / "ok" / "a.png")
    with pytest.raises(ConfigError, match="channels"):
        unfog.create("dataset", "image_folder", root=str(tmp_path / "ok"), channels=2)
    with pytest.raises(ConfigError, match="size"):
        unfog.create("dataset", "image_folder", root=str(tmp_path / "ok"), size=0)
    with pytest.raises(DataError, match="could be read"):
        (tmp_path / "ok" / "a.png").write_bytes(b"broken")
        unfog.create("dataset", "image_folder", root=str(tmp_path / "ok"), skip_bad_files=True)


# ------------------------------------------------------------------------ cifar10 and mnist

tv_datasets = pytest.importorskip("torchvision.datasets")


@pytest.fixture
def offline(monkeypatch):
    """Every URL fails as it would without a network (so no test ever downloads anything)."""

    def urlopen(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known (simulated offline)")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


@pytest.mark.parametrize("download", [False, True])
def test_cifar10_absent_data_gives_a_clear_error(tmp_path, offline, download):
    with pytest.raises(DataError) as info:
        unfog.create("dataset", "cifar10", root=str(tmp_path), download=download)
    msg = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert "cifar-10-python.tar.gz" in msg
    assert ("downloading it failed" in msg) == download


@pytest.mark.parametrize("download", [False, True])
def test_mnist_absent_data_gives_a_clear_error(tmp_path, offline, download):
    with pytest.raises(DataError) as info:
        unfog.create("dataset", "mnist", root=str(tmp_path), download=download)
    msg = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg
    assert ("downloading it failed" in msg) == download


def write_fake_cifar10(root: Path, n_per_batch: int = 4) -> list[str]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"class{i}" for i in range(10)]
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        data[0, :] = 0
        data[0, :1024] = 255  # first image: pure red
        labels = [(k + i) % 10 for i in range(n_per_batch)]
        entry = {
            "batch_label": name.encode(),
            "labels": labels,
            "data": data,
            "filenames": [b"x"] * len(data),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": n_per_batch, "num_vis": 3072}, f)
    return names


def test_cifar10_loads_the_real_pickle_format(tmp_path, offline, monkeypatch):
    names = write_fake_cifar10(tmp_path)
    # The fake files cannot match torchvision's MD5 sums; everything else is the real code path.
    monkeypatch.setattr(tv_datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_datasets.cifar, "check_integrity", lambda *a, **k: True)
    train = unfog.create("dataset", "cifar10", root=str(tmp_path), download=True)
    test = unfog.create("dataset", "cifar10", root=str(tmp_path), split="test", download=False)
    assert (len(train), len(test)) == (20, 4)
    assert train.data_shape == (3, 32, 32) and train.data_range == (-1.0, 1.0)
    assert train.num_classes == 10 and train.class_names == tuple(names)
    for i in (0, 5, 19):
        check_item_matches_metadata(train, i)
    x = test[0]["x"]
    assert torch.equal(x[0], torch.ones(32, 32)) and torch.equal(x[1:], -torch.ones(2, 32, 32))
    assert [int(test[i]["label"]) for i in range(4)] == [5, 6, 7, 8]


def write_idx(path: Path, array: np.ndarray) -> None:
    type_code = 0x08  # unsigned byte
    header = struct.pack(">I", (type_code << 8) | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_loads_the_real_idx_format(tmp_path, offline):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    train = unfog.create("dataset", "mnist", root=str(tmp_path), download=False)
    assert len(train) == 6 and train.data_shape == (1, 28, 28) and train.num_classes == 10
    check_item_matches_metadata(train, 3)
    assert int(train[3]["label"]) == 3
    test = unfog.create("dataset", "mnist", root=str(tmp_path), split="test", pad_to_32=True)
    assert len(test) == 3 and test.data_shape == (1, 32, 32)
    x = check_item_matches_metadata(test, 0)["x"]
    assert torch.equal(x[:, 2:30, 2:30], torch.ones(1, 28, 28))  # the image, all white
    assert float(x[:, :2].max()) == -1.0 and float(x[:, :, 30:].max()) == -1.0  # black padding
