"""``unfog train-autoencoder``: this plugin's command (an entry point of ``unfog.commands``), run
by unfog like its own: Hydra config, run folder ``outputs/autoencoder/DATE/TIME``, one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unfog.commands.base import Command, call

CONFIG_DIR = Path(__file__).resolve().parent / "conf"


def _command(cfg: Any, out_dir: Path) -> float:
    from unfog_autoencoders.training import train_autoencoder

    result = call(train_autoencoder, cfg, out_dir)
    m = result.metrics
    scores = (f"held-out PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}" + (f", FD {m['fd']:.4g}" if "fd" in m else "")
              if m else "no held-out metrics (eval.samples=0)")
    shapes = f"{'×'.join(map(str, result.data_shape))} → {'×'.join(map(str, result.latent_shape))}"
    print(f"unfog: trained a {result.name} autoencoder ({shapes}) to step {result.steps} in {result.seconds:.1f} s; "
          f"{scores}. Folder: {result.out_dir}")
    print(f"unfog: use it with autoencoder={result.name} autoencoder.weights={result.out_dir.resolve()}")
    return m.get("psnr", float("nan"))


TRAIN_AUTOENCODER = Command(
    name="train-autoencoder", summary="train a first-stage autoencoder for latent diffusion",
    run=_command, config="train_autoencoder", config_dir=CONFIG_DIR, output="autoencoder",
    usage="unfog train-autoencoder dataset=shapes dataset.size=64 autoencoder=kl autoencoder.factor=4",
)
