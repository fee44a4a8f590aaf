"""Experiment loggers: wandb by default (offline without a key or network), CSV, TensorBoard."""

from __future__ import annotations

import netrc
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np

from unfog.errors import ConfigError

LOGGERS = ("wandb", "csv", "tensorboard")
WANDB_HOST = "api.wandb.ai"


def wandb_api_key() -> str | None:
    """The wandb API key from the environment or ~/.netrc, if any."""
    key = os.environ.get("WANDB_API_KEY")
    if key:
        return key
    try:
        auth = netrc.netrc().authenticators(WANDB_HOST)
    except (OSError, netrc.NetrcParseError):
        return None
    return auth[2] if auth else None


def _reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode(offline: Any = "auto") -> str:
    """``online`` or ``offline``: offline when asked, or with no API key, or no network."""
    env = os.environ.get("WANDB_MODE")
    if env == "":  # set but empty: wandb itself would reject it, so treat it as unset
        del os.environ["WANDB_MODE"]
    if env in ("offline", "disabled", "dryrun"):
        return "offline" if env == "dryrun" else env
    if offline is True or offline == "true":
        return "offline"
    if offline not in ("auto", False, "false"):
        raise ConfigError(f"logger.offline must be auto, true or false; got {offline!r}.")
    if wandb_api_key() is None or not _reachable(WANDB_HOST):
        return "offline"
    return "online"


def build_logger(node: Any, run_dir: Path, config: dict[str, Any] | None = None, run_id: str | None = None,
                 resume: bool = False, sweep: dict[str, str] | None = None, verbose: bool = False,
                 resume_step: int = 0) -> Any:
    """A Lightning logger from a ``logger`` config node (``None`` means no logger).

    For wandb, ``run_id`` is the run's id (kept in checkpoints, so ``resume`` continues the
    same run instead of starting another), and a ``sweep``'s ``group`` and ``name`` group its
    jobs unless the config sets them. wandb's banners show only when ``verbose``. A CSV log
    resumed in the folder it was written in continues its ``metrics.csv`` from ``resume_step``
    (Lightning's would delete the file).
    """
    if node is None:
        return False
    kwargs = dict(node)
    name = kwargs.pop("_name_", None)
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        mode = wandb_mode(kwargs.pop("offline", "auto"))
        if not verbose:
            os.environ.setdefault("WANDB_SILENT", "true")
        for key, value in (sweep or {}).items():
            if kwargs.get(key) is None:
                kwargs[key] = value
        extra = {"id": run_id, "resume": "allow" if resume else None}
        logger = WandbLogger(save_dir=str(run_dir), mode=mode, config=config, **_drop_none({**kwargs, **extra}))
        # Lightning always passes anonymous=None, which wandb answers with a deprecation warning
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)
        return logger
    if name == "csv":
        logger = _continuing_csv_logger(resume_step if resume else 0)(save_dir=str(run_dir), name="csv", version="",
                                                                       **kwargs)
        logger.log_hyperparams(config or {})  # csv/hparams.yaml: the resolved config and versions
        return logger
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", **kwargs)
        logger.log_hyperparams(config or {})
        return logger
    raise ConfigError(f"Unknown logger {name!r}; choose one of {', '.join(LOGGERS)} with logger=NAME.")


def _drop_none(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def log_picture(logger: Any, key: str, picture: np.ndarray, step: int) -> None:
    """Send a uint8 H×W×C picture to whichever logger is in use."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[picture], step=step)
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, picture, step, dataformats="HWC")


def _continuing_csv_logger(resume_step: int) -> type:
    """Lightning's CSVLogger, except that a ``metrics.csv`` already in its folder (a run resumed
    where it was written: a requeued job) is continued: its rows before ``resume_step`` are kept,
    those the resumed run will log again are dropped, and new rows are appended."""
    import csv

    from lightning.fabric.loggers.logger import rank_zero_experiment
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class ContinuingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            path = Path(self.metrics_file_path)
            if not path.is_file():
                return
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                keys, rows = list(reader.fieldnames or []), list(reader)
            kept = [r for r in rows if r.get("step") not in (None, "") and int(float(r["step"])) < resume_step]
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(kept)
            self.metrics_keys = keys

    class ContinuingCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self) -> ExperimentWriter:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = ContinuingWriter(log_dir=self.log_dir)
            return self._experiment

    return ContinuingCSVLogger
