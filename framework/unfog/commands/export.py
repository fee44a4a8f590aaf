"""``unfog export``: write a trained generator in another format (``unfog list exporter``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unfog.commands.base import Command
from unfog.export import export
from unfog.schemas import ExportConfig


def _command(cfg: Any, out_dir: Path) -> None:
    from unfog.commands.base import call

    written = call(export, cfg, out_dir)
    print(f"unfog: exported {cfg.checkpoint} as {cfg.format._name_} to {written}")


COMMAND = Command(
    name="export", summary="write a checkpoint as safetensors or a diffusers pipeline",
    run=_command, config="export", schema=ExportConfig,
    usage="unfog export checkpoint=PATH format=diffusers sampler=ddim output_dir=DIR",
)
