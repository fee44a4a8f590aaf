"""Training options that go through the trainer config, run in-process on tiny settings."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from unfog.cli import conf_dir
from unfog.config import register_configs
from unfog.run import train

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
