"""wandb runs: a resumed training continues its run; each sweep job is its own run, grouped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _cli import run
from hydra import compose, initialize_config_dir

from unfog.commands import conf_dir
from unfog.commands.train import train
from unfog.config import register_configs

TINY = ["backbone=unet_tiny", "trainer=debug", "logger=wandb", "data.batch_size=8", "sampling.num_samples=0"]


def _cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=[*TINY, *overrides])


def _run_ids(folder: Path) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[1] for p in folder.rglob("offline-run-*"))


def test_resume_continues_the_same_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = train(_cfg("trainer.max_steps=2"), tmp_path / "first")
    rest = train(_cfg("trainer.max_steps=3", f"ckpt_path={first.checkpoint}"), tmp_path / "rest")
    (run_id,) = _run_ids(tmp_path / "first")
    assert _run_ids(tmp_path / "rest") == [run_id]
    assert torch.load(rest.checkpoint, weights_only=True)["unfog"]["run_id"] == run_id


def test_each_sweep_job_is_its_own_run_in_the_sweeps_group(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun" / "my-sweep"
    run("train", "-m", *TINY, "trainer.max_steps=1", "schedule=linear,cosine", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    ids = [_run_ids(job) for job in jobs]
    assert len(jobs) == 2 and all(len(i) == 1 for i in ids) and ids[0] != ids[1]
    for job in jobs:  # the run record in wandb's offline file carries the group and job name
        record = next(job.rglob("*.wandb")).read_bytes()
        assert b"multirun_my-sweep" in record
        assert job.name.split(",")[0].encode() in record
