"""``unfog config``: the composed training config, checked, printed."""

from __future__ import annotations

from typing import Any

from unfog.commands.base import Command, fail
from unfog.errors import UnfogError


def compose_train(overrides: list[str]) -> Any:
    """The ``unfog train`` config for ``overrides``, checked as ``unfog train`` checks it before
    building anything (ranges, components, combinations)."""
    from unfog.building import validate
    from unfog.commands.hydra_app import compose
    from unfog.commands.train import COMMAND as TRAIN
    from unfog.schemas import TrainConfig, check_config

    cfg = compose(TRAIN, overrides)
    check_config(cfg, TrainConfig)
    validate(cfg)
    return cfg


def _command(args: list[str]) -> int:
    from omegaconf import OmegaConf

    from unfog.commands.hydra_app import one_line

    try:
        cfg = compose_train(args)
    except UnfogError as exc:
        fail(exc)
    except Exception as exc:  # Hydra's and OmegaConf's composition errors
        fail(RuntimeError(one_line(exc)))
    print(OmegaConf.to_yaml(cfg), end="")
    return 0


COMMAND = Command(name="config", summary="print the composed training config", run=_command,
                  usage="unfog config backbone=dit_tiny")
