"""A NaN loss stops the run with a clear message and leaves the last good checkpoint intact."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

import unfog
from unfog import registry
from unfog.commands import conf_dir
from unfog.commands.train import train
from unfog.config import register_configs
from unfog.errors import NonFiniteLossError
from unfog.pipeline import Pipeline


class NanAfter(nn.Module):
    """A backbone whose output turns NaN after ``after`` training forwards."""

    data_ranks: ClassVar[tuple[int, ...]] = (3,)
    routes: ClassVar[tuple[str, ...]] = ("vector",)

    def __init__(self, data_shape: tuple[int, ...], cond_dim: int = 0, after: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(data_shape[0], data_shape[0], 1)
        self.vec = nn.Linear(cond_dim, 1) if cond_dim else None
        self.after, self.calls = after, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        out = self.conv(x)
        if self.vec is not None:
            out = out + self.vec(cond["vector"])[:, :, None, None]
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                out = out * float("nan")
        return out


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    with registry.isolated():
        unfog.register("backbone", "nan_after")(NanAfter)
        register_configs()
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[
                "backbone=nan_after", "backbone.after=4", "trainer=debug", "trainer.max_steps=10",
                "checkpoint.every_n_steps=2", "logger=csv", "sampling.num_samples=0"])
        with pytest.raises(NonFiniteLossError, match=r"became nan at step 4.*ckpt_path="):
            train(cfg, tmp_path)
        last = tmp_path / "checkpoints" / "last.ckpt"
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 4
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
        assert Pipeline.load(last).config["backbone"]["_name_"] == "nan_after"
