"""The Pipeline: the one loader and the one way to draw, extended by a plugin's format with no
change to the kernel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import unfog
from unfog import registry
from unfog.building import build_model
from unfog.config import build
from unfog.pipeline import DiffusionPipeline, Pipeline
from unfog.sampling import draw
from unfog.schemas import SamplingSettings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "old_checkpoints"
CFG = {"backbone": {"_name_": "unet", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                    "attention_levels": [1], "groups": 4, "dropout": 0.0},
       "conditioners": {"class_label": {"_name_": "class_label", "dim": 8}},
       "schedule": {"_name_": "linear", "num_timesteps": 100}, "prediction": "eps",
       "dataset": {"_name_": "digits"}, "sigma_data": None}


def _pipeline() -> DiffusionPipeline:
    torch.manual_seed(0)
    model = build_model(CFG, (1, 8, 8), 10)
    return DiffusionPipeline(model.eval(), build("schedule", CFG["schedule"]), "eps", data_shape=(1, 8, 8),
                             data_range=(-1, 1), config=CFG, versions={"unfog": unfog.__version__})


def test_generate_is_the_seeded_draw_whatever_the_batch() -> None:
    pipe, sampler = _pipeline(), unfog.create("sampler", "ddim", steps=4)
    values = {"label": torch.arange(6) % 10}
    settings = SamplingSettings(guidance=2.0, seed=3, batch_size=4)
    x = pipe.generate(sampler, 6, values, settings)
    same = draw(pipe.model, pipe.schedule, sampler, "eps", (1, 8, 8), range(6), seed=3, values=values,
                guidance=2.0, clip=(-1.0, 1.0), batch_size=6)
    torch.testing.assert_close(x, same, rtol=0, atol=1e-6)
    part = pipe.generate(sampler, [4, 5], {"label": values["label"][4:]}, settings)
    torch.testing.assert_close(part, x[4:], rtol=0, atol=1e-6)  # sample k is sample k, drawn with any others


def test_settings_the_model_cannot_draw_with_are_refused_before_drawing() -> None:
    pipe = _pipeline()
    with pytest.raises(unfog.errors.ConfigError, match="guidance names \\['text'\\]"):
        pipe.generate(unfog.create("sampler", "ddim", steps=2), 2, None, SamplingSettings(guidance={"text": 2}))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    pipe = _pipeline()
    pipe.save(tmp_path / "export")
    loaded = Pipeline.load(tmp_path / "export")
    assert isinstance(loaded, DiffusionPipeline) and loaded.data_shape == (1, 8, 8) and loaded.num_classes == 10
    a, b = pipe.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "export" / "unfog.json").read_text())["wiring"]["num_classes"] == 10


class Scaled(Pipeline):
    """a .scaled file: another pipeline's samples times a factor (a stand-in for a cascade)"""

    def __init__(self, inner: Pipeline, factor: float) -> None:
        self.inner, self.factor = inner, factor
        self.data_shape, self.data_range, self.sample_rate = inner.data_shape, None, None
        self.config, self.versions, self.source = {"inner": inner.source, "factor": factor}, {}, None

    @property
    def conditioners(self) -> Any:
        return self.inner.conditioners

    def check(self, settings: SamplingSettings) -> None:
        self.inner.check(settings)

    def generate(self, sampler: Any, n: Any, values: Any = None, settings: Any = None, **kw: Any) -> torch.Tensor:
        return self.inner.generate(sampler, n, values, settings, **kw) * self.factor

    @classmethod
    def recognizes(cls, path: Path) -> bool:
        return path.suffix == ".scaled"

    @classmethod
    def from_path(cls, path: Path, *, use_ema: bool = True) -> Scaled:
        spec = json.loads(path.read_text())
        return cls(Pipeline.load(spec["inner"], use_ema=use_ema), spec["factor"])


def test_a_plugin_format_loads_through_the_same_call_and_command(tmp_path: Path) -> None:
    """A plugin registers a `pipeline` entry; `Pipeline.load` and `unfog sample` use it unchanged."""
    from hydra import compose, initialize_config_dir

    from unfog.commands import conf_dir
    from unfog.commands.sample import sample
    from unfog.config import register_configs

    spec = tmp_path / "half.scaled"
    spec.write_text(json.dumps({"inner": str(FIXTURES / "digits_unet.ckpt"), "factor": 0.5}))
    with registry.isolated():
        unfog.register("pipeline", "scaled")(Scaled)
        assert isinstance(Pipeline.load(spec), Scaled)
        register_configs()
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="sample", overrides=[f"checkpoint={spec}", "num_samples=4", "sampler.steps=5",
                                                           "guidance=2", "device=cpu"])
        out = sample(cfg, tmp_path / "out")
    expected = np.load(FIXTURES / "digits_unet_samples.npz")["samples"]
    np.testing.assert_allclose(out.samples.numpy(), expected * 0.5, rtol=0, atol=1e-7)
    assert list(np.load(out.npz)["labels"]) == [0, 1, 2, 3]


def test_requests_a_model_cannot_take_are_refused_naming_what_it_takes() -> None:
    from unfog.errors import ConfigError
    from unfog.sampling import requested_values

    classes = Pipeline.load(FIXTURES / "digits_unet.ckpt")
    with pytest.raises(ConfigError, match="no conditioner of this model reads text .*'class_label'"):
        requested_values(classes.conditioners, 3, {"prompt": "a cat"})
    with pytest.raises(ConfigError, match=r"guidance names \['text'\], but this model's conditioners are \['class_"):
        classes.check(SamplingSettings(guidance={"text": 2}))
    sound = Pipeline.load(FIXTURES / "tones_unet1d.ckpt")  # unconditional
    with pytest.raises(ConfigError, match="labels=... was given, but this model has no conditioner"):
        requested_values(sound.conditioners, 3, {"labels": [1]})
    with pytest.raises(ConfigError, match="guidance=2.0 needs a conditioner, but this model has none"):
        sound.check(SamplingSettings(guidance=2.0))
