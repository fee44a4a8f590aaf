"""``unfog train-classifier``: this plugin's command (an entry point of ``unfog.commands``), run
by unfog like its own: Hydra config, run folder ``outputs/classifier/DATE/TIME``, one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unfog.commands.base import Command, call

CONFIG_DIR = Path(__file__).resolve().parent / "conf"


def _command(cfg: Any, out_dir: Path) -> None:
    from unfog_metrics.classifier import train_classifier

    result = call(train_classifier, cfg, out_dir)
    print(f"unfog: trained a classifier in {result['seconds']:.0f} s, held-out accuracy "
          f"{result['accuracy']:.4f}; use it with extractor=classifier extractor_weights={result['out_dir']}")


TRAIN_CLASSIFIER = Command(
    name="train-classifier", summary="train a feature extractor for in-domain metrics",
    run=_command, config="train_classifier", config_dir=CONFIG_DIR, output="classifier",
    usage="unfog train-classifier dataset=digits",
)
