"""Training options that go through the trainer config, run in-process on tiny settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import unfog
from unfog.commands import conf_dir
from unfog.commands.train import train
from unfog.config import register_configs
from unfog.errors import ConfigError

TINY = ["backbone=unet_tiny", "trainer=debug", "logger=csv", "data.batch_size=16", "sampling.num_samples=0"]


def _cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=[*TINY, *overrides])


def test_gradient_accumulation_updates_ema_once_per_optimizer_step(tmp_path: Path) -> None:
    result = train(_cfg("trainer.max_steps=3", "trainer.accumulate_grad_batches=2"), tmp_path)
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert ckpt["global_step"] == 3
    assert int(ckpt["state_dict"]["ema.updates"]) == 3


def test_bf16_mixed_precision_on_cpu_trains(tmp_path: Path) -> None:
    result = train(_cfg("trainer.max_steps=2", "trainer.precision=bf16-mixed"), tmp_path)
    assert result.final_loss is not None and torch.isfinite(torch.tensor(result.final_loss))


def test_v_x0_and_flow_prediction_train_and_sample(tmp_path: Path) -> None:
    for prediction in ("v", "x0", "flow"):
        result = train(_cfg("trainer.max_steps=2", f"prediction={prediction}", "sampling.num_samples=4",
                            "sampler.steps=3"), tmp_path / prediction)
        assert result.samples is not None and result.samples.is_file()


def test_edm_preconditioning_with_weighting_and_offset_noise_trains_and_samples(tmp_path: Path) -> None:
    from unfog.pipeline import Pipeline

    result = train(_cfg("trainer.max_steps=2", "prediction=edm", "sigma_data=0.6", "loss.weighting=min_snr",
                        "loss.offset_noise=0.1", "sampling.num_samples=4", "sampler.steps=3"), tmp_path)
    assert result.samples is not None and result.samples.is_file()
    pipe = Pipeline.load(result.checkpoint)
    assert pipe.config["prediction"] == "edm" and pipe.config["sigma_data"] == 0.6 and pipe.sigma_data == 0.6
    assert pipe.config["loss"] == {"weighting": "min_snr", "min_snr_gamma": 5.0, "offset_noise": 0.1}
    sampler = unfog.create("sampler", "heun", steps=3, spacing="trailing")
    x = pipe.generate(sampler, 4, {"label": torch.arange(4)})
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


def test_loss_options_are_checked_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Unknown loss weighting 'snr'"):
        train(_cfg("loss.weighting=snr"), tmp_path / "a")
    with pytest.raises(ConfigError, match="offset_noise=0.1 shifts each channel.*toy2d"):
        train(_cfg("experiment=toy2d", "loss.offset_noise=0.1"), tmp_path / "b")
    with pytest.raises(ConfigError, match="sigma_data=-1.0 is out of range"):
        train(_cfg("sigma_data=-1"), tmp_path / "c")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob("*.ckpt"))


def test_compiled_backbone_trains_and_its_checkpoint_loads_uncompiled(tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    from unfog.pipeline import Pipeline

    counters.clear()
    # "eager" runs TorchDynamo's capture without code generation: the real compile path, fast.
    result = train(_cfg("experiment=toy2d", "backbone=mlp_toy", "trainer.max_steps=2", "trainer.compile=eager"),
                   tmp_path)
    assert counters["stats"]["unique_graphs"] > 0, "the backbone was not compiled"
    state = torch.load(result.checkpoint, weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in state), "compiling must not rename the weights"
    model = Pipeline.load(result.checkpoint).model
    assert model.backbone._compiled_call_impl is None  # loading for sampling does not compile


def test_scalar_conditioner_trains_and_draws_its_grid(tmp_path: Path) -> None:
    # the digit label read as a number: a continuous condition routed like any vector one
    result = train(_cfg("conditioner=scalar", "conditioners.scalar.field=label", "conditioners.scalar.high=9", "trainer.max_steps=2",
                        "sampling.num_samples=5", "sampler.steps=2"), tmp_path)
    assert result.samples is not None and result.samples.is_file()


def test_channels_last_trains_and_its_checkpoint_loads_as_usual(tmp_path: Path) -> None:
    from unfog.building import build_model
    from unfog.pipeline import Pipeline

    cfg = _cfg("trainer.max_steps=2", "trainer.channels_last=true", "sampling.num_samples=2", "sampler.steps=2",
               "conditioner=class_label")
    model = build_model(cfg, (1, 8, 8), 10)
    model.use_channels_last()
    assert model.backbone.inp.weight.is_contiguous(memory_format=torch.channels_last)
    result = train(cfg, tmp_path)
    assert result.samples is not None and result.samples.is_file()
    loaded = Pipeline.load(result.checkpoint).model
    assert not loaded.channels_last  # a memory order of the run, not of the model
