"""``format=safetensors``: unfog's own export folder, for any backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unfog import register
from unfog.errors import ConfigError
from unfog.pipeline import DiffusionPipeline


@register("exporter", "safetensors")
class SafetensorsExporter:
    """unfog's export folder: model.safetensors (the weights) and unfog.json (config, wiring,
    versions, source, sha256); read back by `unfog sample checkpoint=FOLDER`, any backbone."""

    def export(self, pipeline: Any, out_dir: Path, sampler: Any = None) -> Path:
        """Write the folder through the pipeline's own ``save``; return it."""
        if not isinstance(pipeline, DiffusionPipeline):
            raise ConfigError(f"format=safetensors writes one diffusion model; {type(pipeline).__name__} has no "
                              "single model to save. Export each of its stages instead.")
        return Path(pipeline.save(out_dir))
