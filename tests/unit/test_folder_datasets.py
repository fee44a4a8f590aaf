"""The folder datasets (``image_folder``, ``audio_folder``) as one design: root checks,
labels by subfolder, captions from ``metadata.jsonl`` or ``NAME.txt``, sizes, bad files."""

from __future__ import annotations

import importlib.util
import json
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import unfog
from unfog.config import build
from unfog.errors import ConfigError, DataError

needs_soundfile = pytest.mark.skipif(
    importlib.util.find_spec("soundfile") is None, reason="audio_folder needs soundfile (pip install 'unfog[audio]')"
)


def write_png(path: Path, size: tuple[int, int] = (12, 10), color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """A plain-coloured RGB PNG of ``size`` (width, height)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_wav(path: Path, seconds: float = 0.05, rate: int = 8000) -> Path:
    """A mono 16-bit WAV of a 440 Hz sine."""
    t = np.arange(round(seconds * rate)) / rate
    pcm = np.round(0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return path


@dataclass
class Kind:
    """One folder dataset under test: its key, file extension, writer and small settings."""

    name: str
    ext: str
    write: Any
    settings: dict[str, Any]

    def file(self, root: Path, stem: str) -> Path:
        return self.write(root / f"{stem}{self.ext}")

    def build(self, root: Path, **kw: Any) -> Any:
        return unfog.create("dataset", self.name, root=str(root), **{**self.settings, **kw})


IMAGE = Kind("image_folder", ".png", write_png, {"size": 8})
SOUND = Kind("audio_folder", ".wav", write_wav, {"sample_rate": 8000, "length": 256})


@pytest.fixture(params=[IMAGE, pytest.param(SOUND, marks=needs_soundfile)], ids=lambda k: k.name)
def kind(request: pytest.FixtureRequest) -> Kind:
    return request.param


def items(ds: Any) -> list[dict[str, Any]]:
    """Every item, each checked against the dataset's metadata."""
    out = [ds[i] for i in range(len(ds))]
    for item in out:
        assert tuple(item) == tuple(ds.fields)
        assert tuple(item["x"].shape) == ds.data_shape and item["x"].dtype == torch.float32
    return out


# ------------------------------------------------------------------------------------- roots


def test_bad_roots_raise_the_same_errors_for_both(kind: Kind, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as info:
        kind.build(missing)
    assert str(missing) in str(info.value) and "dataset.root" in str(info.value)
    a_file = kind.file(tmp_path, "lonely")
    with pytest.raises(DataError, match="is a file, not a folder") as info:
        kind.build(a_file)
    assert "Set dataset.root" in str(info.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing to see")
    kind.file(tmp_path / "empty" / ".hidden", "secret")  # hidden folders are not searched
    with pytest.raises(DataError, match=rf"no \w+ files found under dataset.root .*{kind.ext}") as info:
        kind.build(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)
    for root in ("", None, 3):
        with pytest.raises(ConfigError, match="dataset.root must be the path of a folder"):
            unfog.create("dataset", kind.name, root=root, **kind.settings)


def test_labels_come_from_immediate_subfolders(kind: Kind, tmp_path: Path) -> None:
    for cls, n in (("b_dogs", 1), ("a_cats", 2)):
        for i in range(n):
            kind.file(tmp_path / cls, f"{i}")
    kind.file(tmp_path / "a_cats" / "deeper", "x")
    kind.file(tmp_path / "a_cats", "._x")  # hidden: left out
    ds = kind.build(tmp_path)
    assert len(ds) == 4 and ds.class_names == ("a_cats", "b_dogs") and ds.num_classes == 2
    assert ds.fields == ("x", "label")
    assert [int(item["label"]) for item in items(ds)] == [0, 0, 0, 1]
    kind.file(tmp_path, "top")  # one file directly in the root: unlabelled
    ds = kind.build(tmp_path)
    assert ds.fields == ("x",) and ds.labels is None and ds.num_classes is None and ds.class_names is None


# ------------------------------------------------------------------------------------ captions


def write_metadata(folder: Path, *lines: Any) -> Path:
    """A metadata.jsonl with one line per argument (dicts as JSON, strings as they are)."""
    path = folder / "metadata.jsonl"
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8")
    return path


def test_captions_from_metadata_jsonl_coexist_with_labels(kind: Kind, tmp_path: Path) -> None:
    kind.file(tmp_path / "cats", "0")
    kind.file(tmp_path / "dogs", "0")
    kind.file(tmp_path / "dogs", "1")
    write_metadata(tmp_path, {"file_name": f"dogs/1{kind.ext}", "text": "a second dog", "extra": 5},
                   "", {"file_name": f"./cats/0{kind.ext}", "text": "a cat"})
    # relative to its own folder; raw U+2028 inside a JSON string and CRLF line ends are fine
    line = json.dumps({"file_name": f"0{kind.ext}", "text": "a dog\u2028indoors"}, ensure_ascii=False)
    (tmp_path / "dogs" / "metadata.jsonl").write_bytes(f"{line}\r\n".encode())
    ds = kind.build(tmp_path)
    assert ds.fields == ("x", "label", "caption") and ds.class_names == ("cats", "dogs")
    got = [(int(item["label"]), item["caption"]) for item in items(ds)]
    assert got == [(0, "a cat"), (1, "a dog\u2028indoors"), (1, "a second dog")]
    assert "captioned" in repr(ds)


def test_captions_from_txt_sidecars(kind: Kind, tmp_path: Path) -> None:
    kind.file(tmp_path, "a")
    kind.file(tmp_path, "b")
    (tmp_path / "a.txt").write_text("  a red square\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("ünïcode, two\nlines", encoding="utf-8")
    ds = kind.build(tmp_path)
    assert ds.fields == ("x", "caption")
    assert [item["caption"] for item in items(ds)] == ["a red square", "ünïcode, two\nlines"]
    write_metadata(tmp_path, {"file_name": f"b{kind.ext}", "text": "from metadata"})
    assert kind.build(tmp_path).captions == ["a red square", "from metadata"]  # a metadata line wins
    assert kind.build(tmp_path, captions="none").fields == ("x",)


def test_a_txt_file_without_a_partner_is_not_a_caption(kind: Kind, tmp_path: Path) -> None:
    kind.file(tmp_path, "a")
    (tmp_path / "notes.txt").write_text("not a caption")
    ds = kind.build(tmp_path)
    assert ds.fields == ("x",) and ds.captions is None


def test_missing_captions_are_refused_or_empty(kind: Kind, tmp_path: Path) -> None:
    for i in range(8):
        kind.file(tmp_path / "sub", f"{i}")
    (tmp_path / "sub" / "3.txt").write_text("only this one")
    with pytest.raises(DataError, match="7 of 8 .* have no caption") as info:
        kind.build(tmp_path)
    msg = str(info.value)
    assert f"'sub/0{kind.ext}'" in msg and f"'sub/5{kind.ext}'" in msg and "and 2 more" in msg
    assert f"sub/7{kind.ext}" not in msg and "dataset.captions=optional" in msg
    ds = kind.build(tmp_path, captions="optional")
    assert ds.captions == [""] * 3 + ["only this one"] + [""] * 4
    write_metadata(tmp_path)  # an empty metadata.jsonl still asks for captions
    (tmp_path / "sub" / "3.txt").unlink()
    with pytest.raises(DataError, match="8 of 8"):
        kind.build(tmp_path)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"file_name": "a.png", "text": "x"', r"line 2 is not valid JSON \("),
        ('["a.png", "x"]', "line 2 holds .* not a JSON object"),
        ('{"file_name": "a.png"}', "line 2 has no 'text' key \\(its keys: 'file_name'\\)"),
        ('{"caption": "x"}', "line 2 has no 'file_name' and no 'text' key"),
        ('{"file_name": "", "text": "x"}', "line 2: file_name must be a non-empty string"),
        ('{"file_name": "a.png", "text": 3}', "line 2: text must be a string"),
        ('{"file_name": "gone.png", "text": "x"}', "line 2 names 'gone.png', which does not exist"),
        ('{"file_name": "notes.md", "text": "x"}', "line 2 names 'notes.md', which is not one of the image files"),
        ('{"file_name": "a.png", "text": "again"}', r"line 2 captions 'a.png' again \(first at .* line 1\)"),
    ],
    ids=["bad-json", "not-an-object", "no-text", "no-keys", "empty-name", "text-not-str", "unknown-file",
         "not-an-image", "duplicate"],
)
def test_malformed_metadata_jsonl_names_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    write_png(tmp_path / "a.png")
    (tmp_path / "notes.md").write_text("# notes")
    meta = write_metadata(tmp_path, {"file_name": "a.png", "text": "fine"}, line)
    with pytest.raises(DataError, match=match) as info:
        IMAGE.build(tmp_path)
    assert str(meta) in str(info.value)
    assert IMAGE.build(tmp_path, captions="none").fields == ("x",)  # captions=none does not read it


def test_captions_batch_as_a_list_of_strings(tmp_path: Path) -> None:
    for i, word in enumerate(("red", "green", "blue")):
        write_png(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a {word} square")
    ds = IMAGE.build(tmp_path)
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["caption"] == ["a red square", "a green square", "a blue square"]
    assert batch["x"].shape == (3, 3, 8, 8)
    text = unfog.create("conditioner", "text", dim=16, heads=2, layers=1, max_length=8)
    assert torch.isfinite(text(batch["caption"])).all()  # what the text conditioner reads


# ---------------------------------------------------------------------------------- image size


def test_non_square_size_covers_then_centre_crops(tmp_path: Path) -> None:
    from PIL import Image

    # 100×50 (w×h): red | green (columns 15..84) | blue. To 30×40 (h×w): scale 0.6 → 60×30,
    # the centre 40 columns are original columns ~17..83; to 40×30: scale 0.8 → 80×40, the
    # centre 30 columns are original columns ~31..69. Both lie in the green band.
    img = Image.new("RGB", (100, 50), (255, 0, 0))
    img.paste((0, 255, 0), (15, 0, 85, 50))
    img.paste((0, 0, 255), (85, 0, 100, 50))
    img.save(tmp_path / "wide.png")
    for size, shape in (([30, 40], (3, 30, 40)), ((40, 30), (3, 40, 30)), ([16], (3, 16, 16))):
        ds = IMAGE.build(tmp_path, size=size)
        x = ds[0]["x"]
        assert ds.data_shape == shape and x.shape == shape
        if size != [16]:
            assert torch.allclose(x[1], torch.ones(shape[1:]), atol=0.05)
            assert torch.allclose(x[[0, 2]], -torch.ones(2, *shape[1:]), atol=0.05)
    greys = IMAGE.build(tmp_path, size=[5, 7], channels=1)
    assert greys.data_shape == (1, 5, 7) and greys[0]["x"].shape == (1, 5, 7)


@pytest.mark.parametrize("size", [0, -3, [0, 4], [4, 0], [1, 2, 3], [], "64", 3.5, True, [30, "40"], None])
def test_bad_sizes_are_refused(tmp_path: Path, size: Any) -> None:
    write_png(tmp_path / "a.png")
    with pytest.raises(ConfigError, match=r"size must be a positive integer .* \[height, width\]"):
        IMAGE.build(tmp_path, size=size)


def test_size_pair_composes_from_the_command_line(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from unfog.config import register_configs

    write_png(tmp_path / "data" / "a.png")
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "primary.yaml").write_text("defaults:\n  - dataset: image_folder\n  - _self_\n")
    register_configs()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="primary",
                      overrides=[f"dataset.root={tmp_path / 'data'}", "dataset.size=[30,40]", "dataset.captions=none"])
    assert build("dataset", cfg.dataset).data_shape == (3, 30, 40)


# ------------------------------------------------------------------------ bad files, old configs


def test_skip_bad_files_leaves_out_random_bytes(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png")
    (tmp_path / "x.png").write_bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes())
    write_metadata(tmp_path, {"file_name": "a.png", "text": "good"}, {"file_name": "x.png", "text": "bad"})
    ds = IMAGE.build(tmp_path)
    assert len(ds) == 2
    with pytest.raises(DataError, match=r"cannot read image file .*x\.png.*dataset\.skip_bad_files=true"):
        ds[1]
    with pytest.warns(RuntimeWarning, match="skipped 1 of 2 image files"):
        ds = IMAGE.build(tmp_path, skip_bad_files=True)
    assert ds.files == [str(tmp_path / "a.png")] and ds.captions == ["good"]
    assert len(ds.skipped) == 1 and str(tmp_path / "x.png") in ds.skipped[0]
    with pytest.raises(IndexError, match="out of range"):
        ds[1]


def test_old_configs_build_the_same_dataset(tmp_path: Path) -> None:
    write_png(tmp_path / "cats" / "a.png", size=(20, 10))
    write_png(tmp_path / "dogs" / "b.png")
    old = {"_name_": "image_folder", "root": str(tmp_path), "size": 64, "channels": 3, "skip_bad_files": False}
    ds = build("dataset", old)
    assert ds.data_shape == (3, 64, 64) and ds.fields == ("x", "label") and ds.size == 64
    assert ds.class_names == ("cats", "dogs") and ds.data_range == (-1.0, 1.0)
    assert repr(ds) == f"ImageFolder(root={str(tmp_path)!r}, n=2, shape=(3, 64, 64), 2 classes)"
    assert [tuple(item["x"].shape) for item in items(ds)] == [(3, 64, 64)] * 2


@needs_soundfile
def test_old_audio_configs_build_the_same_dataset(tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav")
    old = {"_name_": "audio_folder", "root": str(tmp_path), "sample_rate": 8000, "length": 512, "channels": 1,
           "seed": 0, "skip_bad_files": False}
    ds = build("dataset", old)
    assert ds.data_shape == (1, 512) and ds.fields == ("x",)
    assert repr(ds) == f"AudioFolder(root={str(tmp_path)!r}, n=1, sample_rate=8000, shape=(1, 512), unlabelled)"
    assert torch.equal(ds[0]["x"], ds[0]["x"])  # the crop depends on (seed, index) only


def test_unknown_caption_mode_is_refused(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="captions must be one of 'auto', 'optional', 'none'"):
        IMAGE.build(tmp_path, captions="always")
