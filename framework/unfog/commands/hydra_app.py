"""Running a command's Hydra application: composition, run folder, checks and error handling,
the same for unfog's commands and a plugin's."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unfog.commands.base import Command, call, conf_dir, fail, split_metrics
from unfog.config import register_configs
from unfog.errors import ConfigError
from unfog.schemas import check_config

_SCRIPT = ["unfog"]  # the path this process was started as, kept for relaunching DDP workers
_OUTPUT = ["run"]  # the running command's folder under outputs/ (read by the unfog_output resolver)
PATH_KEYS = ("checkpoint", "ckpt_path", "output_dir")  # left out of sweep folder names: paths would nest folders


def run_hydra(command: Command, args: list[str]) -> int:
    """Compose ``command``'s config from ``args`` and run it as a Hydra application."""
    import hydra

    overrides = split_metrics(args) if command.metric_lists else list(args)
    config_dir, extra = _setup(command)
    if not any(a.startswith("-") for a in overrides):  # a single run: report a bad override in one line
        try:
            compose(command, overrides)
        except Exception as exc:  # Hydra and OmegaConf report bad overrides with many error types
            fail(ConfigError(one_line(exc)))
    saved = sys.argv
    _SCRIPT[0] = saved[0] if saved else "unfog"
    sys.argv = [f"unfog {command.name}", *_with_overrides(overrides, extra)]
    try:
        hydra.main(config_path=str(config_dir), config_name=command.config, version_base="1.3")(
            lambda cfg: _task(command, cfg))()
    finally:
        sys.argv = saved
    return 0


def _with_overrides(args: list[str], extra: list[str]) -> list[str]:
    """``args`` with ``extra`` overrides placed right after the user's own: Hydra's parser takes
    one run of overrides, so they must not be split by a flag (``-m``, ``--cfg hydra``)."""
    from hydra._internal.utils import get_args_parser

    given = get_args_parser().parse_known_args(args)[0].overrides
    if not given:
        return [*extra, *args]
    last = len(args) - 1 - args[::-1].index(given[-1])
    return [*args[: last + 1], *extra, *args[last + 1 :]]


def compose(command: Command, overrides: list[str]) -> Any:
    """``command``'s config for ``overrides``, composed as ``unfog COMMAND OVERRIDES`` composes it
    (without running anything; the schema's ranges are not checked here)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    config_dir, extra = _setup(command)
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return hydra_compose(config_name=command.config, overrides=[*extra, *overrides])


def _setup(command: Command) -> tuple[Path, list[str]]:
    """Register every component's config, point the run folder at the command's, and return the
    command's config folder with the overrides that put unfog's presets on its search path."""
    from omegaconf import OmegaConf

    register_configs()
    _OUTPUT[0] = command.output or command.name
    OmegaConf.register_new_resolver("unfog_output", lambda: _OUTPUT[0], replace=True)
    config_dir = Path(command.config_dir or conf_dir())
    extra = ["hydra/output=unfog", f"hydra.job.config.override_dirname.exclude_keys=[{','.join(PATH_KEYS)}]",
             f"hydra.job.name={command.name.replace('-', '_')}"]  # names the log file and `--help`'s app
    if config_dir.resolve() != conf_dir().resolve():  # a plugin's command: unfog's presets too
        extra.append(f"hydra.searchpath=[file://{conf_dir()}]")
    return config_dir, extra


def _task(command: Command, cfg: Any) -> Any:
    if command.schema is not None:
        call(check_config, cfg, command.schema)
    return call(command.run, cfg, output_dir(cfg))


def one_line(exc: BaseException) -> str:
    """A composition error in one line: the key, what was wrong, and the options where Hydra lists them."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    first = str(chain[0]).strip()
    if "Available options" in first:  # an unknown config-group option
        lines = [ln.strip() for ln in first.splitlines() if ln.strip()]
        options = [ln for ln in lines[2:] if " " not in ln]
        return f"{lines[0].replace('Could not find', 'there is no option')}; the options are: {', '.join(options)}."
    keyed = next((e for e in chain if getattr(e, "full_key", None)), None)
    if keyed is not None:  # OmegaConf: the key and its own message, without the object types
        msg = (getattr(keyed, "msg", None) or str(keyed)).strip().splitlines()[0]
        override = next((ln.split("use ", 1)[1] for ln in first.splitlines() if "To append" in ln), None)
        if override and override.startswith("+conditioners."):
            name = override.split(".")[1]
            return (f"{override[1:]}: no conditioner {name!r} is chosen (conditioner=auto chooses from the data). "
                    f"Choose it with conditioner={name}, or write {override} to set it in case auto picks it.")
        hint = f" To add a key, write {override}." if override else ""
        return f"{keyed.full_key}: {msg}{hint}"
    return " ".join(ln.strip() for ln in first.splitlines()[:2] if ln.strip())


def output_dir(cfg: Any) -> Path:
    """Where this run writes: ``output_dir=`` when the command has that key and it is set,
    else the run folder Hydra made."""
    from hydra.core.hydra_config import HydraConfig

    if "output_dir" in cfg and cfg.get("output_dir"):
        return Path(cfg.output_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def sweep_names() -> dict[str, str] | None:
    """Under ``-m``, the sweep (its folder name) and this job (number and overrides), for loggers."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from unfog.config import short_dirname

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    group = "_".join(Path(hc.sweep.dir).parts[-2:])  # multirun/train/DATE/TIME -> DATE_TIME
    return {"group": group, "name": f"{hc.job.num}_{short_dirname(hc.job.override_dirname)}"}


def prepare_worker_launch(command: str) -> None:
    """Make Lightning's DDP launcher start the other processes as *this job*.

    Lightning re-runs ``sys.argv`` with ``hydra.run.dir=<HydraConfig run.dir>``. Under
    ``-m`` that would start the whole sweep again in every worker (the known DDP + multirun
    hang) and point it at the wrong folder, so the arguments become this job's own
    overrides and the run folder this job's output folder.
    """
    import shutil

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    hydra_cfg = HydraConfig.get()
    script = _SCRIPT[0]
    if not Path(script).is_file():
        script = shutil.which("unfog") or script
    sys.argv = [script, command, *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")


@contextlib.contextmanager
def distributed_job() -> Iterator[None]:
    """Leave no distributed state behind a job, so the next job of a sweep starts its own
    processes: Lightning's launcher sets LOCAL_RANK & co. in this process (which would make the
    next job believe it is a worker and wait forever) and keeps the process group open."""
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
