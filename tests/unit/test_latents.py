"""The first stage (unfog.latents): the normalised latent space, the cache of posteriors — built
once under a lock, atomically, checked against the weights and data that made it — and the
augmentation that commutes with it."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import unfog
from unfog.errors import ConfigError, DataError
from unfog.latents import (
    LatentDataset,
    LatentSpace,
    cache_key,
    latent_cache,
    latent_space,
    normalization,
    state_sha256,
)

KL = {"_name_": "kl", "factor": 2, "channels": 8, "norm_groups": 4, "latent_channels": 3}
SHAPES = {"_name_": "shapes", "size": 16, "length": 24, "max_objects": 2}


def _space(seed: int = 0) -> LatentSpace:
    torch.manual_seed(seed)
    space = latent_space(KL, (3, 16, 16))
    assert space is not None
    return space


def _pixels(node: dict = SHAPES):
    return unfog.create("dataset", "shapes", **{k: v for k, v in node.items() if k != "_name_"})


def test_identity_is_pixel_space() -> None:
    assert latent_space(None, (3, 8, 8)) is None
    assert latent_space({"_name_": "identity"}, (2,)) is None


def test_the_weights_hash_follows_the_weights() -> None:
    a, b = _space(0), _space(0)
    assert a.sha256 == b.sha256 == state_sha256(a.autoencoder)
    assert _space(1).sha256 != a.sha256
    with torch.no_grad():
        b.autoencoder.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    b._sha = None
    assert b.sha256 != a.sha256


def test_normalisation_is_undone_before_decoding() -> None:
    space = _space()
    space.shift.copy_(torch.tensor([0.5, -1.0, 2.0]))
    space.scale.copy_(torch.tensor([2.0, 0.5, 4.0]))
    x = _pixels()[0]["x"][None]
    raw = space.autoencoder.encode(x)
    post = space.encode(x)
    torch.testing.assert_close(post.mean, (raw.mean - space.shift.view(1, -1, 1, 1)) * space.scale.view(1, -1, 1, 1))
    torch.testing.assert_close(post.std, raw.std * space.scale.view(1, -1, 1, 1))
    torch.testing.assert_close(space.decode(post.mean), space.autoencoder.decode(raw.mean), atol=1e-5, rtol=1e-5)


def test_a_cache_holds_the_posterior_and_every_field(tmp_path: Path) -> None:
    space, pixels = _space(), _pixels()
    data = latent_cache(space, pixels, SHAPES, tmp_path, batch_size=10, log=lambda *a: None)
    assert isinstance(data, LatentDataset) and len(data) == len(pixels) and data.data_shape == (3, 8, 8)
    item, original = data[5], pixels[5]
    post = space.autoencoder.encode(original["x"][None])
    torch.testing.assert_close(item["x"], post.mean[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(item["x_std"], post.std[0], atol=1e-5, rtol=1e-5)
    assert item["caption"] == original["caption"] and int(item["label"]) == int(original["label"])
    assert torch.equal(item["objects"], original["objects"])
    assert not list(tmp_path.glob("*.tmp-*"))  # built in a temporary folder, renamed into place


def test_statistics_normalise_the_drawn_latents_to_unit_variance(tmp_path: Path) -> None:
    space = _space()
    data = latent_cache(space, _pixels(), SHAPES, tmp_path, log=lambda *a: None)
    shift, scale, how = normalization(space, "auto", data.statistics)
    assert how.startswith("per channel")
    data.normalize(shift, scale)
    torch.manual_seed(0)
    draws = torch.stack([data[i]["x"] + data[i]["x_std"] * torch.randn(data.data_shape) for i in range(len(data))])
    per_channel = draws.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=0.15, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(3), atol=0.15, rtol=0)


def test_normalisation_modes(tmp_path: Path) -> None:
    space = _space()
    with pytest.raises(ConfigError, match="no fixed scale_factor"):
        normalization(space, "fixed", lambda: None)
    with pytest.raises(ConfigError, match="choose one of"):
        normalization(space, "unit", lambda: None)
    shift, scale, how = normalization(space, "none", lambda: pytest.fail("statistics are not needed"))
    assert torch.equal(shift, torch.zeros(3)) and torch.equal(scale, torch.ones(3)) and how == "none"


def _build_in_process(args: tuple[str, str]) -> float:
    root, out = args
    space = _space()
    data = latent_cache(space, _pixels(), SHAPES, Path(root),
                        log=lambda msg: Path(out).open("a").write(msg + "\n"))
    return float(data[0]["x"].sum())


def test_processes_side_by_side_build_one_cache(tmp_path: Path) -> None:
    # what DDP ranks (or two runs) do at once: one encodes, the other waits on the lock and reads
    logs = [str(tmp_path / f"log{i}") for i in range(2)]
    ctx = multiprocessing.get_context("spawn")  # fork deadlocks beside the threads of a full test session
    with ctx.Pool(2) as pool:
        firsts = pool.map(_build_in_process, [(str(tmp_path / "root"), log) for log in logs])
    assert firsts[0] == firsts[1]
    said = "".join(Path(log).read_text() for log in logs)
    assert said.count("encoding 24 items") == 1 and said.count("read from the cache") == 1
    assert len([p for p in (tmp_path / "root").iterdir() if p.is_dir()]) == 1


def test_a_killed_build_leaves_nothing_that_is_read(tmp_path: Path) -> None:
    space, pixels = _space(), _pixels()
    key = cache_key(space, SHAPES)
    (tmp_path / f"{key}.tmp-12345").mkdir(parents=True)  # what a build killed half-way leaves
    (tmp_path / f"{key}.tmp-12345" / "mean.npy").write_bytes(b"half")
    messages: list[str] = []
    latent_cache(space, pixels, SHAPES, tmp_path, log=messages.append)
    assert any("encoding" in m for m in messages)


def test_random_bytes_in_a_cache_are_a_clear_error(tmp_path: Path) -> None:
    space, pixels = _space(), _pixels()
    data = latent_cache(space, pixels, SHAPES, tmp_path, log=lambda *a: None)
    (data.folder / "mean.npy").write_bytes(os.urandom(300))
    with pytest.raises(DataError, match="damaged.*delete that folder"):
        latent_cache(space, pixels, SHAPES, tmp_path, log=lambda *a: None)
    (data.folder / "manifest.json").write_bytes(os.urandom(50))
    with pytest.raises(DataError, match="unreadable manifest.json"):
        latent_cache(space, pixels, SHAPES, data.folder, log=lambda *a: None)


def test_a_cache_named_directly_must_match_weights_and_data(tmp_path: Path) -> None:
    pixels = _pixels()
    folder = latent_cache(_space(0), pixels, SHAPES, tmp_path, log=lambda *a: None).folder
    assert latent_cache(_space(0), pixels, SHAPES, folder, log=lambda *a: None).folder == folder
    with pytest.raises(ConfigError, match="was encoded by autoencoder weights"):
        latent_cache(_space(1), pixels, SHAPES, folder, log=lambda *a: None)
    other = {**SHAPES, "seed": 3}
    with pytest.raises(ConfigError, match="another dataset"):
        latent_cache(_space(0), _pixels(other), other, folder, log=lambda *a: None)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["autoencoder"]["config"]["_name_"] == "kl" and manifest["count"] == len(pixels)


def test_flips_through_a_cache_use_the_mirror_images_encoded(tmp_path: Path) -> None:
    # kl does not commute with a flip, so the cache holds the posterior of each mirrored image
    space, pixels = _space(), _pixels()
    data = latent_cache(space, pixels, SHAPES, tmp_path, mirrored=True, log=lambda *a: None)
    assert data.manifest["mirrored"]
    item = data[3]
    mirror = space.autoencoder.encode(pixels[3]["x"][None].flip(-1))
    torch.testing.assert_close(item["x_mirror"], mirror.mean[0], atol=1e-5, rtol=1e-5)
    batch = {k: torch.stack([item[k]] * 64) for k in ("x", "x_std", "x_mirror", "x_std_mirror")}
    batch["x_std"] = batch["x_std_mirror"] = torch.zeros_like(batch["x_std"])
    torch.manual_seed(0)
    z = space.draw(batch, flip=True)
    mirrored = torch.tensor([torch.equal(r, item["x_mirror"]) for r in z])
    kept = torch.tensor([torch.equal(r, item["x"]) for r in z])
    assert bool((mirrored | kept).all()) and 10 < int(mirrored.sum()) < 54
    torch.manual_seed(0)
    assert torch.equal(space.draw(batch, flip=True), z)  # the reseeded RNG picks the same items
    # a cache without the mirror images is not taken for one with them
    with pytest.raises(ConfigError, match="no mirrored images"):
        latent_cache(space, pixels, SHAPES, latent_cache(space, pixels, SHAPES, tmp_path, log=lambda *a: None).folder,
                     mirrored=True, log=lambda *a: None)


def test_flips_of_latents_where_they_commute_and_of_pixels() -> None:
    space = _space()
    z = torch.randn(64, 3, 8, 8)
    torch.manual_seed(0)
    out = space.draw({"x": z, "x_std": torch.zeros_like(z)}, flip=True)  # no mirror images: flip the latent
    flipped = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(out, z)])
    same = torch.tensor([torch.equal(a, b) for a, b in zip(out, z)])
    assert bool((flipped | same).all()) and 10 < int(flipped.sum()) < 54
    x = _pixels()[0]["x"][None].repeat(4, 1, 1, 1)  # encoded on the fly: the pixels are flipped first
    torch.manual_seed(1)
    assert space.draw({"x": x}, flip=True).shape == (4, 3, 8, 8)


def test_values_given_as_pixels_are_encoded_for_a_latent_model() -> None:
    space = _space()
    x = _pixels()[0]["x"][None].repeat(2, 1, 1, 1)
    out = space.values_to_latent({"x": x, "label": torch.tensor([1, 2]), "inpaint": {"image": x, "mask": x[:, :1]}})
    assert out["x"].shape == (2, 3, 8, 8) and torch.equal(out["label"], torch.tensor([1, 2]))
    assert out["inpaint"]["image"].shape == (2, 3, 8, 8) and out["inpaint"]["mask"].shape == (2, 1, 16, 16)


def test_a_recorded_latent_space_rebuilds_and_checks_its_weights() -> None:
    space = _space()
    space.shift.fill_(0.25)
    record = space.describe()
    again = LatentSpace.from_record(record, space.state_dict())
    assert again.sha256 == space.sha256 and torch.equal(again.shift, space.shift)
    state = {k: v.clone() for k, v in space.state_dict().items()}
    state["autoencoder.encoder.conv_in.weight"][0, 0, 0, 0] += 1.0
    with pytest.raises(ConfigError, match="not the ones it was trained with"):
        LatentSpace.from_record(record, state)
    assert np.allclose(record["shift"], 0.25)
