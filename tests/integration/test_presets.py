"""Every preset shipped in conf/ composes and passes validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from unfog.building import validate
from unfog.commands import conf_dir
from unfog.config import register_configs

GROUPS = ["backbone", "trainer", "logger", "experiment"]


def _presets() -> list[tuple[str, str]]:
    root = conf_dir()
    return [(g, p.stem) for g in GROUPS for p in sorted((root / g).glob("*.yaml"))]


def _compatible(group: str, name: str) -> list[str]:
    """Overrides that make a preset fit the rest of the default config."""
    if group == "backbone" and name.startswith("mlp"):
        return ["experiment=toy2d", f"backbone={name}"]
    return [f"{group}={name}"]


@pytest.mark.parametrize(("group", "name"), _presets())
def test_preset_composes_and_validates(group: str, name: str) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=_compatible(group, name))
    validate(cfg)
    if group != "experiment":
        assert cfg[group] is not None


def test_every_config_group_has_presets() -> None:
    for group in GROUPS:
        assert list((Path(conf_dir()) / group).glob("*.yaml")), group


IMAGE_EXPERIMENTS = ["digits", "digits_inpaint", "shapes", "shapes_sr", "shapes_text"]


@pytest.mark.parametrize("experiment", IMAGE_EXPERIMENTS)
@pytest.mark.parametrize("backbone", ["unet_tiny", "dit_tiny"])
def test_image_experiments_take_any_image_backbone(experiment: str, backbone: str) -> None:
    """An experiment sets what its data needs, not fields of one backbone: swapping the backbone works."""
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}", f"backbone={backbone}"])
    validate(cfg)
    assert cfg.backbone._name_ == ("dit" if backbone == "dit_tiny" else "unet")
