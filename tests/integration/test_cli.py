"""The real CLI on tiny configs: train, resume, sample, sweep, list, plugins, config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _cli import TINY, run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step digits run with checkpoints every 3 steps."""
    root = tmp_path_factory.mktemp("train")
    run("train", *TINY, "trainer.max_steps=6", "checkpoint.every_n_steps=3", "sampling.every_n_steps=3",
        f"hydra.run.dir={root}", cwd=root)
    return root


def test_train_writes_checkpoint_samples_logs_and_config(trained: Path) -> None:
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    meta = ckpt["unfog"]
    assert meta["config"]["backbone"]["_name_"] == "unet" and meta["config"]["sampler"]["steps"] == 5
    assert meta["versions"]["unfog"] and meta["versions"]["torch"]
    assert meta["wiring"] == {"data_shape": [1, 8, 8], "num_classes": 10, "data_range": [-1.0, 1.0], "sample_rate": None}
    assert any(k.startswith("ema.module.backbone.") for k in ckpt["state_dict"])
    assert (trained / "samples" / "step_0000003.png").is_file()
    assert (trained / "samples" / "step_0000006.png").is_file()
    assert "train/loss" in (trained / "csv" / "metrics.csv").read_text()
    assert (trained / ".hydra" / "config.yaml").is_file()
    hparams = yaml.safe_load((trained / "csv" / "hparams.yaml").read_text())  # config + versions in the logger
    assert hparams["backbone"]["_name_"] == "unet" and hparams["versions"]["unfog"]
    assert (trained / "samples" / "step_0000006.npz").is_file()


def test_resume_continues_from_the_checkpoint(trained: Path, tmp_path: Path) -> None:
    out = run("train", *TINY, "trainer.max_steps=9", f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}",
              f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert "trained 9 steps" in out.stdout
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 9


def test_sample_any_sampler_with_guidance_and_metric(trained: Path, tmp_path: Path) -> None:
    out = run("sample", f"checkpoint={trained / 'checkpoints' / 'last.ckpt'}", "sampler=ddpm", "sampler.steps=10",
              "num_samples=12", "guidance=2.0", "metric=digits_classifier", f"output_dir={tmp_path}", cwd=tmp_path)
    data = np.load(tmp_path / "samples.npz")
    assert data["samples"].shape == (12, 1, 8, 8) and list(data["labels"]) == [i % 10 for i in range(12)]
    assert np.isfinite(data["samples"]).all() and np.abs(data["samples"]).max() <= 1.0
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "metrics.json").is_file()
    assert "accuracy" in out.stdout


def test_sampling_is_deterministic_for_a_seed(trained: Path, tmp_path: Path) -> None:
    ckpt = f"checkpoint={trained / 'checkpoints' / 'last.ckpt'}"
    for name in ("a", "b"):
        run("sample", ckpt, "sampler.steps=4", "num_samples=5", "seed=7", f"output_dir={tmp_path / name}", cwd=tmp_path)
    a, b = (np.load(tmp_path / n / "samples.npz")["samples"] for n in ("a", "b"))
    np.testing.assert_array_equal(a, b)


def test_sweep_runs_one_job_per_value(tmp_path: Path) -> None:
    run("train", "-m", "schedule=linear,cosine", *TINY, "trainer.max_steps=2", "sampling.num_samples=0",
        f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    ckpts = sorted(tmp_path.glob("*/checkpoints/last.ckpt"))
    assert len(ckpts) == 2
    names = {torch.load(c, weights_only=True)["unfog"]["config"]["schedule"]["_name_"] for c in ckpts}
    assert names == {"linear", "cosine"}


@pytest.mark.parametrize("logger", ["wandb", "tensorboard"])
def test_other_loggers_run_offline_without_prompting(logger: str, tmp_path: Path) -> None:
    env = {"WANDB_API_KEY": None, "WANDB_MODE": None, "HOME": str(tmp_path)}  # no key: must go offline itself
    run("train", *TINY, f"logger={logger}", "trainer.max_steps=2", "sampling.every_n_steps=1",
        f"hydra.run.dir={tmp_path}", cwd=tmp_path, env=env, timeout=240)
    if logger == "wandb":
        assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb did not write an offline run"
    else:
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_list_plugins_and_config(tmp_path: Path) -> None:
    listing = run("list", cwd=tmp_path).stdout
    for kind in ("backbone:", "schedule:", "sampler:", "conditioner:", "dataset:", "metric:"):
        assert kind in listing
    assert "ddim" in run("list", "sampler", cwd=tmp_path).stdout
    assert "unfog 0.1.0" in run("plugins", cwd=tmp_path).stdout
    config = run("config", "backbone=unet", "sampler=ddpm", cwd=tmp_path).stdout
    assert "_name_: unet" in config and "_name_: ddpm" in config


def test_bad_override_fails_with_a_message_naming_field_and_component(tmp_path: Path) -> None:
    proc = run("train", "sampler.stepz=3", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "stepz" in proc.stderr and "sampler:ddim" in proc.stderr
    proc = run("train", "backbone=mlp", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "backbone 'mlp' takes samples of rank [1]" in proc.stderr


def test_sampling_sweep_writes_one_folder_per_combination(trained: Path, tmp_path: Path) -> None:
    run("sample", "-m", f"checkpoint={trained / 'checkpoints' / 'last.ckpt'}", "sampler=ddim,heun",
        "sampler.steps=2,3", "guidance=1,2", "num_samples=4", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    folders = sorted(p.parent.name for p in tmp_path.glob("*/samples.npz"))
    assert len(folders) == 8
    assert any("sampler=heun" in f and "sampler.steps=3" in f and "guidance=2" in f for f in folders)


def test_help_lists_every_command_and_an_unknown_one_is_a_one_line_error(tmp_path: Path) -> None:
    help_text = run("--help", cwd=tmp_path).stdout
    for name in ("train", "sample", "evaluate", "export", "config", "list", "plugins", "train-classifier",
                 "train-autoencoder"):
        assert f"  {name} " in help_text, name
    proc = run("trian", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("unfog: error: unknown command 'trian'. Did you mean 'train'?")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_input_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    for args in (["train", "data.batch_size=abc"], ["train", "trainer.max_steps=abc"], ["train", "sampler=ddimm"],
                 ["sample", f"checkpoint={tmp_path / 'nothing.ckpt'}"]):
        proc = run(*args, cwd=tmp_path, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("unfog: error: "), (args, proc.stderr)
