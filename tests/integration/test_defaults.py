"""A user's own folder trains with one override: the backbone, the conditioners and the guidance
of the sample grid follow the data, and the run's first line says what was chosen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _cli import run
from hydra import compose, initialize_config_dir
from PIL import Image

from unfog.commands import conf_dir
from unfog.commands.train import TrainRecipe
from unfog.config import register_configs


def _images(root: Path, size: tuple[int, int], n: int = 6, classes: tuple[str, ...] = (),
            captions: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / classes[i % len(classes)] if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[0], size[1], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    if captions:
        lines = [json.dumps({"file_name": f"{i}.png", "text": f"picture number {i}"}) for i in range(n)]
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _recipe(tmp: Path, *overrides: str) -> TrainRecipe:
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    recipe = TrainRecipe(cfg, tmp / "run")
    assert recipe.check() is None
    recipe.data()
    recipe.model()
    return recipe


def _forward(recipe: TrainRecipe) -> None:
    net, data = recipe.net.eval(), recipe.dataset
    batch = torch.utils.data.default_collate([data[i] for i in range(2)])
    with torch.no_grad():
        out = net(batch["x"], torch.rand(2), net.encode(batch, 2))
    assert out.shape == batch["x"].shape


@pytest.mark.parametrize("size, shape, levels", [(24, (3, 24, 24), 3), ([30, 40], (3, 30, 40), 3)])
def test_an_unlabelled_folder_gets_an_unconditional_unet_sized_for_it(tmp_path: Path, capsys: Any, size: Any,
                                                                    shape: tuple[int, ...], levels: int) -> None:
    root = _images(tmp_path / "photos", (37, 50))  # any size on disk: resized and centre-cropped
    size_override = f"dataset.size={size}".replace(" ", "")
    recipe = _recipe(tmp_path, "dataset=image_folder", f"dataset.root={root}", size_override)
    assert tuple(recipe.dataset.data_shape) == shape
    assert recipe.cfg["backbone"]["_name_"] == "unet" and len(recipe.cfg["backbone"]["channel_mult"]) == levels
    assert recipe.cfg["conditioners"] == {} and recipe.cfg["sampling"]["guidance"] == 1.0
    line = capsys.readouterr().out
    assert f"unfog: data image_folder (6 items of {'×'.join(map(str, shape))})" in line
    assert "backbone=auto: unet" in line and "conditioner=auto: none" in line and "sampling.guidance=auto: 1.0" in line
    _forward(recipe)


def test_subfolders_make_classes_and_captions_make_text_to_image(tmp_path: Path) -> None:
    labelled = _images(tmp_path / "pets", (24, 24), classes=("cats", "dogs"))
    recipe = _recipe(tmp_path, "dataset=image_folder", f"dataset.root={labelled}", "dataset.size=24")
    assert list(recipe.cfg["conditioners"]) == ["class_label"] and recipe.cfg["sampling"]["guidance"] == 2.0
    assert recipe.net.conditioners["class_label"].num_classes == 2
    _forward(recipe)
    captioned = _images(tmp_path / "captioned", (24, 24), captions=True)
    recipe = _recipe(tmp_path, "dataset=image_folder", f"dataset.root={captioned}", "dataset.size=24",
                     "+conditioners.text.dim=32", "+conditioners.text.layers=1")
    assert list(recipe.cfg["conditioners"]) == ["text"]
    chosen = recipe.cfg["conditioners"]["text"]
    assert {"_name_": "text", "dim": 32, "layers": 1, "field": "caption"}.items() <= chosen.items()
    assert recipe.net.backbone.context_dim == 32 and recipe.cfg["sampling"]["guidance"] == 2.0
    _forward(recipe)


def test_a_folder_of_sound_gets_a_1d_unet(tmp_path: Path) -> None:
    from unfog.audio import write_wavs

    clips = torch.sin(torch.linspace(0, 300, 3000))[None, None].repeat(3, 1, 1) * 0.5
    write_wavs(clips, 8000, tmp_path / "sounds")
    recipe = _recipe(tmp_path, "dataset=audio_folder", f"dataset.root={tmp_path / 'sounds'}", "dataset.length=2048",
                     "dataset.sample_rate=8000")
    assert tuple(recipe.dataset.data_shape) == (1, 2048) and recipe.cfg["backbone"]["kernel_size"] == 5
    assert recipe.cfg["conditioners"] == {}
    _forward(recipe)


def test_the_default_experiment_is_still_the_digits_network(tmp_path: Path) -> None:
    """backbone=auto on the 8×8 digits is the unet_digits network, class_label, guidance 2."""
    auto = _recipe(tmp_path / "a")
    preset = _recipe(tmp_path / "b", "backbone=unet_digits", "conditioner=class_label", "sampling.guidance=2")
    assert auto.cfg["backbone"] == preset.cfg["backbone"] and auto.cfg["conditioners"] == preset.cfg["conditioners"]
    assert auto.cfg["sampling"]["guidance"] == 2.0
    a, b = auto.module.state_dict(), preset.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_settings_for_a_conditioner_auto_did_not_choose_are_refused(tmp_path: Path) -> None:
    from unfog.errors import ConfigError

    root = _images(tmp_path / "photos", (16, 16))
    with pytest.raises(ConfigError, match=r"conditioners.class_label sets \['dim'\], but conditioner=auto chose"):
        _recipe(tmp_path, "dataset=image_folder", f"dataset.root={root}", "dataset.size=16",
                "+conditioners.class_label.dim=8")


@pytest.mark.slow
def test_unfog_train_on_a_folder_with_one_override(tmp_path: Path) -> None:
    """The command a user types, shortened to two small steps and a small grid (the defaults —
    batches of 64, a grid of 80 samples of 50 steps, with the 9.3 M U-Net chosen for 64×64 —
    take minutes on 2 CPU cores); the grid is drawn at a visible size."""
    root = _images(tmp_path / "photos", (40, 30), n=8)
    proc = run("train", "dataset=image_folder", f"dataset.root={root}", "trainer.max_steps=2",
               "sampling.num_samples=4", "sampler.steps=3", "data.batch_size=8", f"hydra.run.dir={tmp_path / 'run'}",
               cwd=tmp_path, timeout=600)
    assert "unfog: trained 2 steps" in proc.stdout and "backbone=auto: unet" in proc.stdout
    grid = Image.open(tmp_path / "run" / "samples" / "step_0000002.png")
    assert grid.size[0] >= 256
    assert "GPU available" not in proc.stdout + proc.stderr  # Lightning's banners only with verbose=true
