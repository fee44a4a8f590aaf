"""Components as Hydra config groups: typed fields, compose-time refusals, presets."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import unfog
from unfog import registry
from unfog.building import validate
from unfog.commands import conf_dir
from unfog.config import build, params_of, register_configs
from unfog.errors import ConfigError


def _compose(*overrides: str, name: str = "train"):
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_signature_becomes_typed_fields() -> None:
    params = {p.name: p for p in params_of(unfog.get("sampler", "ddim").obj)}
    assert params["steps"].type is int and params["eta"].type is float
    assert params["spacing"].choices == ("leading", "trailing", "linspace", "uniform", "logsnr", "karras")


def test_wired_parameters_are_not_config_fields() -> None:
    names = {p.name for p in params_of(unfog.get("backbone", "unet").obj)}
    assert "data_shape" not in names and "cond_dim" not in names and "channels" in names


def test_component_selected_with_no_yaml_and_fields_overridden() -> None:
    cfg = _compose("sampler=ddpm", "sampler.steps=20", "schedule=linear", "schedule.num_timesteps=500")
    assert cfg.sampler._name_ == "ddpm" and cfg.sampler.steps == 20
    assert build("schedule", cfg.schedule).num_timesteps == 500


def test_mistyped_field_fails_naming_field_and_component() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        _compose("sampler=ddim", "sampler.stepz=20")
    text = f"{err.value} {err.value.__cause__}"
    assert "stepz" in text and "sampler:ddim" in text


def test_wrong_type_fails_naming_field_and_component() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        _compose("sampler.steps=many")
    text = f"{err.value} {err.value.__cause__}"
    assert "sampler.steps" in text and "sampler:ddim" in text


def test_choice_outside_literal_is_refused_before_building() -> None:
    cfg = _compose("sampler.spacing=sideways")
    expected = "spacing must be one of leading, trailing, linspace, uniform.*got .sideways."
    with pytest.raises(ConfigError, match=expected):
        validate(cfg)


def test_unknown_top_level_key_and_trainer_key_are_refused() -> None:
    with pytest.raises(ConfigCompositionException):
        _compose("learning_rate=1")
    with pytest.raises(ConfigCompositionException):
        _compose("trainer.max_stepz=3")


def test_guidance_without_conditioner_is_refused() -> None:
    cfg = _compose("experiment=toy2d", "sampling.guidance=3")
    with pytest.raises(ConfigError, match="needs a conditioner"):
        validate(cfg)


def test_unknown_prediction_target_is_refused() -> None:
    with pytest.raises(ConfigError, match="eps, x0, v"):
        validate(_compose("prediction=score"))


def test_plugin_component_becomes_a_config_group_option() -> None:
    with registry.isolated():

        @unfog.register("sampler", "every_other")
        class EveryOther:
            """A test sampler."""

            def __init__(self, stride: int = 2, tag: str = "x") -> None:
                self.stride, self.tag = stride, tag

        cfg = _compose("sampler=every_other", "sampler.stride=5")
        assert OmegaConf.to_container(cfg.sampler) == {"_name_": "every_other", "stride": 5, "tag": "x"}
        assert build("sampler", cfg.sampler).stride == 5
