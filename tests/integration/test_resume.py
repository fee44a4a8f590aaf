"""Exact resume: a run stopped at step N and resumed reaches the state of an uninterrupted run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from unfog.commands import conf_dir
from unfog.commands.train import train
from unfog.config import register_configs
from unfog.errors import ConfigError

COMMON = ["trainer=debug", "logger=csv", "sampling.num_samples=0", "optim.warmup_steps=3"]
SETUPS = {
    # 64 points in batches of 16: 4 batches a pass, so step 6 is mid-pass and passes are crossed
    "toy2d": ["experiment=toy2d", "dataset.size=64", "data.batch_size=16"],
    # a U-Net with dropout and a class conditioner that drops labels at random
    "digits": ["backbone=unet_tiny", "backbone.dropout=0.1", "conditioner=class_label",
               "conditioners.class_label.dropout=0.3", "data.batch_size=8"],
    # a latent model: a fresh draw from each cached posterior, random flips of the latents
    "latent": ["dataset=shapes", "dataset.size=16", "dataset.length=40", "backbone=unet_tiny", "autoencoder=kl",
               "autoencoder.factor=2", "autoencoder.channels=8", "autoencoder.norm_groups=4", "data.batch_size=8",
               "data.hflip=true"],
}


def _cfg(setup: str, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=[*COMMON, *SETUPS[setup], *overrides])


def _losses(run_dir: Path) -> dict[int, str]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_resumed_run_is_bit_for_bit_the_uninterrupted_run(tmp_path: Path, setup: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNFOG_CACHE_DIR", str(tmp_path / "cache"))
    whole = train(_cfg(setup, "trainer.max_steps=10"), tmp_path / "whole")
    first = train(_cfg(setup, "trainer.max_steps=6"), tmp_path / "first")
    rest = train(_cfg(setup, "trainer.max_steps=10", f"ckpt_path={first.checkpoint}"), tmp_path / "rest")
    a = torch.load(whole.checkpoint, weights_only=True)
    b = torch.load(rest.checkpoint, weights_only=True)
    assert a["global_step"] == b["global_step"] == 10
    assert int(b["state_dict"]["batches_seen"]) == 10 and int(b["state_dict"]["ema.updates"]) == 10
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():  # weights, EMA weights, counters
        assert torch.equal(value, b["state_dict"][key]), key
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in opt_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a[i][name], opt_b[i][name]), (i, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    whole_losses, rest_losses = _losses(whole.run_dir), _losses(rest.run_dir)
    assert rest_losses, "the resumed run logged no losses"
    for step, loss in rest_losses.items():  # the loss curve continues exactly
        assert whole_losses[step] == loss, step
    # and the first part matches the start of the uninterrupted run
    for step, loss in _losses(first.run_dir).items():
        assert whole_losses[step] == loss, step


def test_resuming_with_other_model_settings_names_them(tmp_path: Path) -> None:
    first = train(_cfg("toy2d", "trainer.max_steps=2"), tmp_path / "first")
    with pytest.raises(ConfigError) as err:
        train(_cfg("toy2d", "trainer.max_steps=4", "backbone.hidden=48", f"ckpt_path={first.checkpoint}"),
              tmp_path / "resumed")
    assert "backbone.hidden=48 (checkpoint: " in str(err.value) and ".hydra/config.yaml" in str(err.value)
