"""``unfog export``: a trained generator written in another format.

Formats are ``exporter`` components (the config group ``format``; ``unfog list exporter``):
``format=safetensors`` writes unfog's own export folder (any backbone, read back by
``unfog sample checkpoint=FOLDER``), ``format=diffusers`` a diffusers pipeline folder (from the
``unfog_diffusers`` plugin), and a plugin adds others. Each gets the loaded
:class:`~unfog.pipeline.Pipeline`, the output folder and the sampler chosen on the command line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unfog.config import build
from unfog.errors import ConfigError
from unfog.pipeline import Pipeline


def export(cfg: Mapping[str, Any], out_dir: str | Path | None = None) -> Path:
    """Export as ``cfg`` says (``checkpoint``, ``use_ema``, ``format``, ``sampler``) into
    ``out_dir`` (default: ``cfg.output_dir``); return what was written."""
    target = out_dir if out_dir is not None else cfg.get("output_dir")
    if not target:
        raise ConfigError("export needs output_dir=FOLDER.")
    exporter = build("exporter", cfg["format"])
    sampler = build("sampler", cfg["sampler"]) if cfg.get("sampler") is not None else None
    pipeline = Pipeline.load(cfg["checkpoint"], use_ema=bool(cfg.get("use_ema", True)))
    return Path(exporter.export(pipeline, Path(target), sampler))
