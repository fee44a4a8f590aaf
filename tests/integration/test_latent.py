"""Latent diffusion through the command line: a tiny ``kl`` autoencoder, the latent cache built
once and read after, sampling and export that decode without being told, and the bad inputs a
user meets (weights that are not there, a cache of other weights, latents the backbone cannot
take, a resume with another autoencoder), each refused before training starts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import run
from PIL import Image

TINY_AE = ["autoencoder=kl", "autoencoder.factor=2", "autoencoder.channels=8", "autoencoder.norm_groups=4",
           "autoencoder.latent_channels=3"]
LATENT = ["dataset=shapes", "dataset.size=16", "dataset.length=96", "dataset.max_objects=1", "backbone=unet_tiny",
          "trainer=debug", "logger=csv", "data.batch_size=16", "sampling.num_samples=8", "sampler.steps=4",
          *TINY_AE]


def _train(tmp: Path, *extra: str, check: bool = True) -> tuple[str, Path | None]:
    proc = run("train", *LATENT, *extra, cwd=tmp, env={"UNFOG_CACHE_DIR": str(tmp / "cache")}, check=check)
    out = proc.stdout + proc.stderr
    found = re.search(r"checkpoint: (\S+last\.ckpt)", out)
    return out, Path(found.group(1)) if found else None


def _caches(tmp: Path) -> list[Path]:
    root = tmp / "cache" / "latents"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    tmp = tmp_path_factory.mktemp("latent")
    out, ckpt = _train(tmp)
    assert ckpt is not None, out
    return tmp, out, ckpt


def test_latent_training_encodes_once_and_reads_the_cache_after(trained: tuple[Path, str, Path]) -> None:
    tmp, first, ckpt = trained
    assert "encoding 96 items with autoencoder kl" in first
    assert "3×16×16 → latents 3×8×8 by kl" in first
    [cache] = _caches(tmp)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["count"] == 96 and manifest["latent_shape"] == [3, 8, 8]
    assert set(manifest["fields"]) >= {"caption", "label"}  # conditioning travels with the latents
    second, _ = _train(tmp)
    assert "read from the cache" in second and "encoding" not in second
    assert _caches(tmp) == [cache]
    # other autoencoder weights (another seed initialises the kl differently): a new cache beside it
    third, _ = _train(tmp, "seed=1")
    assert "encoding 96 items" in third
    assert len(_caches(tmp)) == 2


def test_the_checkpoint_records_its_autoencoder_and_samples_decode(trained: tuple[Path, str, Path]) -> None:
    tmp, _, ckpt = trained
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)["unfog"]
    record = meta["autoencoder"]
    assert record["config"]["_name_"] == "kl" and record["config"]["factor"] == 2
    assert len(record["sha256"]) == 64 and len(record["scale"]) == 3
    assert meta["wiring"]["data_shape"] == [3, 16, 16] and meta["wiring"]["latent_shape"] == [3, 8, 8]
    out = tmp / "drawn"
    run("sample", f"checkpoint={ckpt}", "num_samples=4", "sampler=ddim", "sampler.steps=3", f"output_dir={out}",
        cwd=tmp)
    pngs = sorted(out.rglob("*.png"))
    assert pngs, list(out.rglob("*"))
    grid = np.asarray(Image.open(pngs[0]))
    assert grid.ndim == 3 and grid.shape[2] == 3 and min(grid.shape[:2]) >= 16  # pixels, not latents
    # evaluate decodes too, scores the pixels, and records the autoencoder in its protocol
    proc = run("evaluate", f"checkpoint={ckpt}", "metric=shapes_checker", "num_samples=6", "sampler.steps=3",
               f"output_dir={tmp / 'scored'}", cwd=tmp)
    result = json.loads((tmp / "scored" / "evaluation.json").read_text())
    assert result["protocol"]["pipeline"]["autoencoder"]["sha256"] == record["sha256"], proc.stdout


def test_a_latent_pipeline_reloads_from_checkpoint_and_export_identically(trained: tuple[Path, str, Path],
                                                                         tmp_path: Path) -> None:
    import unfog
    from unfog.pipeline import Pipeline
    from unfog.schemas import SamplingSettings

    _, _, ckpt = trained
    pipeline = Pipeline.load(ckpt)
    assert pipeline.data_shape == (3, 16, 16) and pipeline.model_shape == (3, 8, 8)
    sampler = unfog.create("sampler", "ddim", steps=3)
    settings = SamplingSettings(guidance=1.0, seed=3)
    drawn = pipeline.generate(sampler, 4, {"label": torch.arange(4)}, settings)
    assert drawn.shape == (4, 3, 16, 16) and drawn.min() >= -1 and drawn.max() <= 1
    folder = pipeline.save(tmp_path / "export")
    again = Pipeline.load(folder).generate(sampler, 4, {"label": torch.arange(4)}, settings)
    assert torch.equal(drawn, again)
    # the autoencoder's weights are checked against the hash the export recorded
    record = json.loads((folder / "unfog.json").read_text())
    record["autoencoder"]["sha256"] = "0" * 64
    (folder / "unfog.json").write_text(json.dumps(record))
    from unfog.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not the ones it was trained with"):
        Pipeline.load(folder)


def test_without_a_cache_each_batch_is_encoded(tmp_path: Path) -> None:
    out, ckpt = _train(tmp_path, "latents.cache=false")
    assert ckpt is not None and "encoding" not in out and not _caches(tmp_path)


def test_a_missing_weights_folder_is_refused_before_anything_runs(tmp_path: Path) -> None:
    out, ckpt = _train(tmp_path, f"autoencoder.weights={tmp_path / 'nowhere'}", check=False)
    assert ckpt is None and "train-autoencoder" in out and "Traceback" not in out
    assert not _caches(tmp_path)


def test_a_cache_of_other_weights_is_refused(trained: tuple[Path, str, Path], tmp_path: Path) -> None:
    tmp, _, _ = trained
    cache = _caches(tmp)[0]
    proc = run("train", *LATENT, "seed=5", f"latents.cache_dir={cache}", cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "was encoded by autoencoder weights" in out and "Traceback" not in out


def test_latents_the_backbone_cannot_take_are_refused(tmp_path: Path) -> None:
    # a DiT with 4×4 patches cannot tile the 8×8/… latents of factor 4 on 12×12 images
    proc = run("train", *[a for a in LATENT if not a.startswith(("backbone", "autoencoder.factor", "dataset.size"))],
               "dataset.size=12", "autoencoder.factor=4", "backbone=dit_tiny", "backbone.patch_size=2",
               cwd=tmp_path, env={"UNFOG_CACHE_DIR": str(tmp_path / "cache")}, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    assert "latents" in out and "autoencoder kl" in out, out[-2000:]


def test_resuming_with_another_autoencoder_is_refused(trained: tuple[Path, str, Path], tmp_path: Path) -> None:
    _, _, ckpt = trained
    proc = run("train", *LATENT, "trainer.max_steps=8", "seed=7", f"ckpt_path={ckpt}", cwd=tmp_path,
               env={"UNFOG_CACHE_DIR": str(tmp_path / "cache")}, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "autoencoder weights sha256" in out and "Traceback" not in out


def test_super_resolution_in_latent_space_takes_its_low_resolution_image_in_pixels(tmp_path: Path) -> None:
    # image_concat reads field x, which is the latent while training; at sampling time a user's
    # image in pixels is encoded first, so the same call works as for a pixel model
    import unfog
    from unfog.pipeline import Pipeline
    from unfog.schemas import SamplingSettings

    out, ckpt = _train(tmp_path, "conditioner=image_concat", "conditioners.image_concat.factor=2",
                       "sampling.guidance=1")
    assert ckpt is not None, out
    pipeline = Pipeline.load(ckpt)
    assert pipeline.conditioners["image_concat"].data_shape == (3, 8, 8)  # built for the latents
    low = unfog.create("dataset", "shapes", size=16, length=3, seed=9)
    images = torch.stack([low[i]["x"] for i in range(3)])
    drawn = pipeline.generate(unfog.create("sampler", "ddim", steps=3), 3, {"x": images}, SamplingSettings(seed=1))
    assert drawn.shape == (3, 3, 16, 16) and torch.isfinite(drawn).all()
