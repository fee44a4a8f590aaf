"""``unfog sample``: draw from a trained generator with any sampler; write a grid, the samples
(``.npz``, WAV for sound) and, with ``metric=...``, their scores."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unfog.commands.base import Command
from unfog.config import build, plain
from unfog.evaluation import build_metrics, score, table
from unfog.pipeline import Pipeline
from unfog.sampling import captions_of, labels_of, requested_values
from unfog.schemas import SampleConfig, SamplingSettings, check_config
from unfog.util import resolve_device, version_of


@dataclass
class SampleResult:
    """What ``unfog sample`` wrote."""

    samples: torch.Tensor
    labels: torch.Tensor | None
    grid: Path | None
    npz: Path
    metrics: dict[str, dict[str, float]] | None  # {metric: {value name: value}}


def sample(cfg: Mapping[str, Any], out_dir: Path) -> SampleResult:
    """Draw ``num_samples`` from ``checkpoint`` with ``sampler``; write them into ``out_dir``."""
    import numpy as np

    from unfog.audio import is_audio, write_wavs
    from unfog.images import picture, save_png, visible

    check_config(cfg, SampleConfig)
    settings = SamplingSettings.of(cfg)
    sampler = build("sampler", cfg["sampler"])
    metrics = build_metrics(cfg.get("metrics"))
    device = resolve_device(cfg["device"])
    pipeline = Pipeline.load(cfg["checkpoint"], use_ema=cfg["use_ema"])
    n = int(cfg["num_samples"])
    conditioners = pipeline.conditioners
    values = requested_values(conditioners, n, cfg)
    samples = pipeline.to(device).generate(sampler, n, values, settings, progress=True)
    labels, captions = labels_of(conditioners, values), captions_of(conditioners, values)
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = out_dir / "samples.npz"
    arrays = {"samples": samples.numpy()} | ({"labels": labels.numpy()} if labels is not None else {})
    arrays |= {"captions": np.array(captions)} if captions is not None else {}
    np.savez(npz, **arrays)
    pic = picture(samples, pipeline.num_classes if labels is not None else None, pipeline.data_range)
    grid = save_png(visible(pic), out_dir / "samples.png") if pic is not None else None
    if pipeline.sample_rate and is_audio(pipeline.data_shape):
        write_wavs(samples, pipeline.sample_rate, out_dir / "wav")
    if captions is not None:
        (out_dir / "prompts.txt").write_text("".join(f"{k}\t{c}\n" for k, c in enumerate(captions)))
    results = None
    if metrics:
        results = score(metrics, samples, labels, captions)
        record = {"results": results, "metrics": plain(cfg["metrics"]), "sampler": plain(cfg["sampler"]),
                  "guidance": settings.guidance, "guidance_rescale": settings.guidance_rescale,
                  "guidance_interval": settings.guidance_interval, "num_samples": n,
                  "seed": settings.seed, "checkpoint": str(cfg["checkpoint"]), "unfog": version_of("unfog")}
        (out_dir / "metrics.json").write_text(json.dumps(record, indent=2))
    return SampleResult(samples, labels, grid, npz, results)


def _command(cfg: Any, out_dir: Path) -> None:
    from unfog.commands.base import call

    result = call(sample, cfg, out_dir)
    grid = f" and {result.grid}" if result.grid else ""
    print(f"unfog: wrote {len(result.samples)} samples to {result.npz}{grid}")
    if result.metrics:
        print(table(result.metrics))


COMMAND = Command(
    name="sample", summary="draw samples from a checkpoint with any sampler",
    run=_command, config="sample", metric_lists=True,  # sample() checks its config (for Python callers too)
    usage="unfog sample checkpoint=PATH sampler=ddpm num_samples=64 guidance=2",
)
