"""Two CPU processes with DDP and FSDP2 (gloo): train, draw the sample grid, checkpoint, resume, sweep."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from _cli import run

import unfog
from unfog.pipeline import Pipeline
from unfog.schemas import SamplingSettings

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
       "backbone=unet_tiny", "logger=csv", "data.batch_size=8", "sampling.num_samples=10", "sampler.steps=3",
       "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=2"]


def _train(tmp: Path, name: str, *overrides: str) -> Path:
    out = tmp / name
    proc = run("train", *DDP, *overrides, f"hydra.run.dir={out}", cwd=tmp, timeout=240)
    assert proc.stdout.count("unfog: trained") == 1, proc.stdout  # one summary, from rank 0
    return out


def test_ddp_trains_draws_the_same_grid_as_one_process_and_resumes_exactly(tmp_path: Path) -> None:
    first = _train(tmp_path, "first", "trainer.max_steps=4", "metric=digits_classifier",
                   "evaluation.every_n_steps=2", "evaluation.num_samples=10")
    ckpt = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and int(ckpt["state_dict"]["batches_seen"]) == 4

    # The grid two processes drew (each half of it) is the grid one process draws.
    drawn = np.load(first / "samples" / "step_0000004.npz")["samples"]
    pipe = Pipeline.load(first / "checkpoints" / "last.ckpt")
    sampler = unfog.create("sampler", "ddim", steps=3)
    alone = pipe.generate(sampler, 10, {"label": torch.arange(10) % 10}, SamplingSettings.of(pipe.config["sampling"]))
    np.testing.assert_allclose(drawn, alone.numpy(), atol=1e-5, rtol=0)

    # Metrics while training: the two processes' shares, scored once, at steps 2 and 4, are
    # the score of the samples one process draws (evaluation.seed = sampling.seed = 0 here).
    lines = [json.loads(line) for line in (first / "evaluation.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    expected = unfog.create("metric", "digits_classifier")
    expected.update(generated=alone, labels=torch.arange(10) % 10)
    assert lines[-1]["results"]["digits_classifier"] == expected.compute()
    assert "eval/digits_classifier/accuracy" in (first / "csv" / "metrics.csv").read_text()

    # Resumed under DDP, the run ends where an uninterrupted DDP run ends.
    resumed = _train(tmp_path, "resumed", "trainer.max_steps=6", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    whole = _train(tmp_path, "whole", "trainer.max_steps=6")
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key

    # FSDP2 shards the model and its EMA copy; it computes what DDP computes, and resumes.
    sharded = _train(tmp_path, "fsdp", "trainer.strategy=fsdp2", "trainer.max_steps=4")
    sharded_resumed = _train(tmp_path, "fsdp_resumed", "trainer.strategy=fsdp2", "trainer.max_steps=6",
                             f"ckpt_path={sharded / 'checkpoints' / 'last.ckpt'}")
    for fsdp_run, ddp_ckpt in ((sharded, ckpt), (sharded_resumed, a)):
        c = torch.load(fsdp_run / "checkpoints" / "last.ckpt", weights_only=True)
        assert c["global_step"] == ddp_ckpt["global_step"]
        assert c["state_dict"].keys() == ddp_ckpt["state_dict"].keys()
        for key, value in ddp_ckpt["state_dict"].items():  # weights and EMA weights, full tensors
            torch.testing.assert_close(c["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    fsdp_grid = np.load(sharded / "samples" / "step_0000004.npz")["samples"]
    np.testing.assert_allclose(fsdp_grid, drawn, atol=1e-4, rtol=0)


def test_ddp_inside_a_sweep_runs_each_job_once(tmp_path: Path) -> None:
    proc = run("train", "-m", *DDP, "trainer.max_steps=2", "sampling.num_samples=0", "schedule=linear,cosine",
               f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, timeout=300)
    ckpts = sorted((tmp_path / "sweep").rglob("last.ckpt"))
    assert len(ckpts) == 2, proc.stdout
    names = {torch.load(c, weights_only=True)["unfog"]["config"]["schedule"]["_name_"] for c in ckpts}
    assert names == {"linear", "cosine"}
    assert proc.stdout.count("unfog: trained") == 2


def test_a_latent_model_under_ddp_encodes_once_and_trains_on_every_process(tmp_path: Path) -> None:
    # both processes need the cache; one builds it while the other waits on the lock, then reads it
    latent = ["dataset=shapes", "dataset.size=16", "dataset.length=64", "autoencoder=kl", "autoencoder.factor=2",
              "autoencoder.channels=8", "autoencoder.norm_groups=4", "trainer.max_steps=2"]
    proc = run("train", *DDP, *latent, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=240,
               env={"UNFOG_CACHE_DIR": str(tmp_path / "cache")})
    out = proc.stdout + proc.stderr
    assert out.count("encoding 64 items") == 1 and out.count("unfog: trained 2 steps") == 1, out
    assert len([p for p in (tmp_path / "cache" / "latents").iterdir() if p.is_dir()]) == 1
    meta = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["unfog"]
    assert meta["wiring"]["latent_shape"] == [4, 8, 8]
