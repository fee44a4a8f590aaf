"""``unfog train-autoencoder`` on tiny settings: the folder it writes loads as ``autoencoder=kl``,
a resumed run ends where an uninterrupted one does, the discriminator starts when asked, and
bad settings are one-line errors before anything trains."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from _cli import run
from safetensors.torch import load_file

import unfog
from unfog.commands.hydra_app import compose
from unfog.errors import ConfigError, UnfogError
from unfog.util import sha256_of
from unfog_autoencoders.commands import TRAIN_AUTOENCODER
from unfog_autoencoders.training import reconstruction_metrics, train_autoencoder

# 16×16 shapes, a 0.04 M-parameter kl autoencoder with f=2 (8×8×4 latents); 20 items in batches of 8,
# so a pass of the data ends mid-batch and a few steps cross passes.
TINY = ["dataset.size=16", "dataset.length=20", "autoencoder.channels=8", "autoencoder.norm_groups=4",
        "autoencoder.factor=2", "batch_size=8", "eval.samples=16", "eval.batch_size=16", "eval.grid=4",
        "progress_bar=false", "log_every_n_steps=1"]
GAN = ["loss.discriminator.weight=0.5", "loss.discriminator.layers=1", "loss.discriminator.channels=8"]


def _cfg(*overrides: str):
    return compose(TRAIN_AUTOENCODER, [*TINY, *overrides])


def _logged(run_dir: Path) -> dict[int, dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): {k: v for k, v in r.items() if v} for r in csv.DictReader(f)}


def test_the_command_writes_a_folder_that_autoencoder_kl_loads(tmp_path: Path) -> None:
    proc = run("train-autoencoder", *TINY, "steps=3", cwd=tmp_path)
    last = proc.stdout.strip().splitlines()[-1]
    found = re.fullmatch(r"unfog: use it with autoencoder=kl autoencoder\.weights=(\S+)", last)
    assert found, proc.stdout
    folder = Path(found.group(1))
    assert folder.parent.parent == (tmp_path / "outputs" / "autoencoder").resolve()
    for name in ("autoencoder.safetensors", "autoencoder.json", "reconstructions.png", "checkpoints/last.ckpt"):
        assert (folder / name).is_file(), name
    record = json.loads((folder / "autoencoder.json").read_text())
    assert record["format"] == "unfog-autoencoder" and record["steps"] == 3
    assert record["config"] == {"_name_": "kl", "factor": 2, "latent_channels": 4, "channels": 8,
                                "channel_mult": [1, 2], "layers_per_block": 1, "attention": True, "norm_groups": 4}
    assert record["sha256"] == sha256_of(folder / "autoencoder.safetensors")
    assert record["data_shape"] == [3, 16, 16] and record["latent_shape"] == [4, 8, 8]
    assert record["data_range"] == [-1.0, 1.0] and record["dataset"]["_name_"] == "shapes"
    assert record["protocol"]["held_out"]["how"] == "seed=1000003" and record["protocol"]["held_out"]["n"] == 16
    assert set(record["metrics"]) == {"psnr", "ssim", "n"}

    ae = unfog.create("autoencoder", "kl", data_shape=(3, 16, 16), weights=str(folder))
    saved = load_file(str(folder / "autoencoder.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in ae.state_dict().items())
    # the recorded metrics are reconstruction_metrics of the first 16 held-out items
    held = unfog.create("dataset", "shapes", size=16, length=20, seed=1000003)
    again = reconstruction_metrics(ae, held, num_samples=16)
    assert again["psnr"] == pytest.approx(record["metrics"]["psnr"], rel=1e-5)
    assert again["ssim"] == pytest.approx(record["metrics"]["ssim"], rel=1e-4, abs=1e-5)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    # the discriminator starts at step 2, so both optimizers and the adaptive weight are covered;
    # step 3 is mid-pass (20 items, batches of 8)
    common = [*GAN, "loss.discriminator.start_step=2"]
    whole = train_autoencoder(_cfg(*common, "steps=5"), tmp_path / "whole")
    first = train_autoencoder(_cfg(*common, "steps=3"), tmp_path / "first")
    rest = train_autoencoder(_cfg(*common, "steps=5", f"ckpt_path={first.checkpoint}"), tmp_path / "rest")
    a, b = (torch.load(r.checkpoint, weights_only=True) for r in (whole, rest))
    assert a["global_step"] == b["global_step"] == 5 and int(b["state_dict"]["batches_seen"]) == 5
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():  # autoencoder, discriminator (BatchNorm statistics too)
        assert torch.equal(value, b["state_dict"][key]), key
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for i, state in opt_a["state"].items():
            for name in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(state[name], opt_b["state"][i][name]), (i, name)
    files = [load_file(str(r.out_dir / "autoencoder.safetensors")) for r in (whole, rest)]
    assert all(torch.equal(v, files[1][k]) for k, v in files[0].items())
    assert whole.metrics == rest.metrics
    whole_log, rest_log = _logged(whole.out_dir), _logged(rest.out_dir)
    assert sorted(rest_log) == [3, 4]
    for step, row in rest_log.items():
        assert row["train/loss"] == whole_log[step]["train/loss"], step


def test_the_discriminator_starts_at_start_step(tmp_path: Path) -> None:
    result = train_autoencoder(_cfg(*GAN, "loss.discriminator.start_step=2", "steps=4", "eval.samples=0",
                                    "eval.grid=0"), tmp_path / "late")
    logged = _logged(result.out_dir)
    assert [s for s, row in logged.items() if "train/d_loss" in row] == [2, 3]
    assert all("train/g_loss" not in logged[s] for s in (0, 1))
    assert float(logged[2]["train/d_weight"]) > 0
    ckpt = torch.load(result.checkpoint, weights_only=True)
    ae_opt, d_opt = ckpt["optimizer_states"]
    assert {float(s["step"]) for s in ae_opt["state"].values()} == {4.0}
    assert {float(s["step"]) for s in d_opt["state"].values()} == {2.0}  # steps 2 and 3 only

    never = train_autoencoder(_cfg(*GAN, "loss.discriminator.start_step=9", "steps=2", "eval.samples=0",
                                   "eval.grid=0"), tmp_path / "never")
    assert torch.load(never.checkpoint, weights_only=True)["optimizer_states"][1]["state"] == {}
    assert all("train/d_loss" not in row for row in _logged(never.out_dir).values())


def test_perceptual_loss_and_reconstruction_fd_with_a_trained_classifier(tmp_path: Path) -> None:
    from unfog_metrics.classifier import train_classifier

    shapes = {"_name_": "shapes", "size": 16, "max_objects": 1, "length": 64, "seed": 0}
    classifier = train_classifier({"dataset": shapes, "steps": 2, "batch_size": 16, "width": 8, "feature_dim": 16,
                                   "eval_samples": 16}, tmp_path / "classifier")["out_dir"]
    result = train_autoencoder(_cfg("steps=2", "loss.perceptual.weight=1",
                                    f"loss.perceptual.extractor_weights={classifier}",
                                    f"eval.extractor_weights={classifier}"), tmp_path / "ae")
    assert result.metrics["fd"] >= 0
    record = json.loads((result.out_dir / "autoencoder.json").read_text())
    sha = sha256_of(Path(classifier) / "classifier.safetensors")
    assert record["protocol"]["fd"]["extractor"] == "classifier" and record["protocol"]["fd"]["weights_sha256"] == sha
    assert record["protocol"]["perceptual_loss"]["weights_sha256"] == sha
    assert "train/perceptual" in _logged(result.out_dir)[0]


@pytest.mark.parametrize(("overrides", "message"), [
    (["steps=0"], "steps=0 is out of range: it must be at least 1"),
    (["steps=2.5"], "steps=2.5; give a whole number"),
    (["lr=0"], "lr=0 is out of range"),
    (["betas=[0.5,1.5]"], "betas=[0.5, 1.5]; give two numbers in [0, 1)"),
    (["loss.kl_weight=-1"], "loss.kl_weight=-1 is out of range: it must be at least 0.0"),
    (["loss.reconstruction=l3"], "loss.reconstruction='l3'; choose one of l1, l2"),
    (["loss.discriminator.weight=-0.5"], "loss.discriminator.weight=-0.5 is out of range"),
    (["loss.discriminator.weight=0.5", "loss.discriminator.layers=3"],
     "loss.discriminator.layers=3 halves 16×16 images below one patch; use loss.discriminator.layers=2 or fewer"),
    (["loss.perceptual.weight=1"], "loss.perceptual.extractor=classifier needs loss.perceptual.extractor_weights"),
    (["loss.perceptual.extractor=vgg"], "loss.perceptual.extractor='vgg'; choose one of classifier, inception, lpips"),
    (["eval.samples=-1"], "eval.samples=-1 is out of range"),
    (["eval.extractor_weights=/nowhere"], "is not a trained classifier"),
    (["device=tpu"], "device='tpu'; choose auto, cpu, cuda or cuda:N"),
    (["ckpt_path=/nowhere/last.ckpt"], "ckpt_path=/nowhere/last.ckpt does not exist"),
])
def test_bad_settings_are_refused_in_one_line_before_training(tmp_path: Path, overrides: list[str],
                                                             message: str) -> None:
    with pytest.raises(UnfogError) as err:
        train_autoencoder(_cfg("steps=1", *overrides), tmp_path)
    text = str(err.value)
    assert message in text and "\n" not in text, text
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (["autoencoder=identity"], "autoencoder=identity is lossless (pixel space): it has nothing to learn"),
    (["dataset=toy2d", "autoencoder.factor=2"], "dataset 'toy2d' gives data of shape (2,), not images C×H×W"),
])
def test_nothing_to_train_and_data_that_are_not_images_are_refused(tmp_path: Path, overrides: list[str],
                                                                  message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        train_autoencoder(compose(TRAIN_AUTOENCODER, ["steps=1", *overrides]), tmp_path)


def test_resuming_an_unfog_train_checkpoint_or_other_networks_is_refused(tmp_path: Path) -> None:
    first = train_autoencoder(_cfg("steps=1", "eval.samples=0", "eval.grid=0"), tmp_path / "first")
    with pytest.raises(ConfigError, match=r"autoencoder.channels=16 \(checkpoint: 8\)"):
        train_autoencoder(_cfg("steps=2", "autoencoder.channels=16", f"ckpt_path={first.checkpoint}"), tmp_path / "x")
    ckpt = torch.load(first.checkpoint, weights_only=True)
    ckpt["unfog"]["command"] = None
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match="is not a checkpoint of `unfog train-autoencoder`"):
        train_autoencoder(_cfg("steps=2", f"ckpt_path={tmp_path / 'other.ckpt'}"), tmp_path / "y")


def test_a_bad_value_on_the_command_line_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    proc = run("train-autoencoder", *TINY, "loss.kl_weight=abc", cwd=tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines == ["unfog: error: loss.kl_weight='abc' is out of range: it must be at least "
                                              "0.0 (LDM: 1e-6)."], proc.stderr


def test_reconstruction_metrics_of_a_perfect_and_a_noisy_autoencoder() -> None:
    from unfog_metrics.features import module_extractor

    x = torch.rand(6, 3, 16, 16) * 2 - 1
    identity = unfog.create("autoencoder", "identity")
    perfect = reconstruction_metrics(identity, x, extractor=module_extractor(torch.nn.Flatten(), "pixels"))
    assert perfect["psnr"] > 100 and perfect["ssim"] == pytest.approx(1.0) and perfect["fd"] == pytest.approx(0.0)
    assert perfect["n"] == 6

    class Shifted:  # reconstructs every pixel 0.1 too high: MSE 0.01, PSNR 10·log10(4 / 0.01) ≈ 26.02 dB
        def encode(self, x):
            return identity.encode(x)

        def decode(self, z):
            return z + 0.1

    y = x.clamp(-0.8, 0.8)  # no clamping of the reconstructions to [-1, 1]
    shifted = reconstruction_metrics(Shifted(), {"x": y}, num_samples=4, batch_size=3)
    assert shifted["psnr"] == pytest.approx(10 * torch.log10(torch.tensor(400.0)).item(), rel=1e-4)
    assert shifted["n"] == 4 and 0 < shifted["ssim"] < 1
