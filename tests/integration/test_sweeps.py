"""Sweeps through Hydra's real plugins: Optuna's sweeper and submitit's launcher (run locally)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from _cli import run

TOY = ["experiment=toy2d", "trainer=debug", "trainer.max_steps=2", "logger=csv", "sampling.num_samples=0",
       "dataset.size=256", "data.batch_size=64"]


def test_optuna_sweeper_minimizes_the_objective_metric(tmp_path: Path) -> None:
    sweep = tmp_path / "optuna"
    run("train", "-m", "hydra/sweeper=unfog_optuna", "hydra.sweeper.n_trials=2", *TOY, f"hydra.sweep.dir={sweep}",
        cwd=tmp_path)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    lrs = {float(torch.load(c, weights_only=True)["unfog"]["config"]["optim"]["lr"]) for c in sweep.rglob("last.ckpt")}
    assert len(lrs) == 2, "each trial trains with its own learning rate"
    assert result["best_params"]["optim.lr"] in lrs
    assert 1e-4 <= result["best_params"]["optim.lr"] <= 3e-3
    assert result["best_value"] > 0


def test_unknown_objective_is_reported_with_the_logged_metrics(tmp_path: Path) -> None:
    proc = run("train", *TOY, "objective=val/fid", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "objective=val/fid was not logged" in proc.stderr and "train/loss" in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file(), "the trained weights are kept"


def test_submitit_launcher_runs_each_job_as_its_own_process(tmp_path: Path) -> None:
    sweep = tmp_path / "submitit"
    run("train", "-m", "hydra/launcher=submitit_local", *TOY, "schedule=linear,cosine", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path)
    assert len(list(sweep.rglob("last.ckpt"))) == 2
    assert list((sweep / ".submitit").iterdir()), "submitit kept no job records"


def test_slurm_preset_composes_with_the_documented_settings(tmp_path: Path) -> None:
    proc = run("train", "hydra/launcher=unfog_slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra",
               "--package", "hydra.launcher", cwd=tmp_path)
    launcher = yaml.safe_load(proc.stdout)  # the hydra.launcher package itself
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["partition"] == "gpu" and launcher["tasks_per_node"] == 1
