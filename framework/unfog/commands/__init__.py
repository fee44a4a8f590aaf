"""unfog's commands: each is a :class:`Command` object named by an entry point of the group
``unfog.commands`` — unfog's own (``train``, ``sample``, ...) exactly as a plugin's
(``train-classifier`` comes from ``unfog_metrics``), so a pip-installed package adds
``unfog NAME`` with no other step.

A command with a Hydra ``config`` gets what every unfog command has: its config composed from
the command line (every registered component is a config-group option, unfog's presets are
on the search path), checked against its ``schema`` before anything runs, a run folder
(``outputs/OUTPUT/DATE/TIME``, ``-m`` sweeps under ``multirun/``), and errors as one line
(``unfog: error: ...``, exit status 1) instead of a traceback.
"""

from __future__ import annotations

import importlib.metadata as metadata
import warnings

from unfog.commands.base import Command, call, conf_dir, fail, split_metrics
from unfog.commands.hydra_app import run_hydra
from unfog.errors import ConfigError, UnfogError

ENTRY_POINT_GROUP = "unfog.commands"

__all__ = ["Command", "available", "call", "conf_dir", "entry_points", "execute", "fail", "load", "split_metrics"]


def entry_points() -> dict[str, metadata.EntryPoint]:
    """The ``unfog.commands`` entry points by command name (first of a name wins)."""
    found: dict[str, metadata.EntryPoint] = {}
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        found.setdefault(ep.name, ep)
    return found


def load(name: str) -> Command:
    """The command ``name``; an unknown name or a command that fails to load is a ConfigError."""
    eps = entry_points()
    if name not in eps:
        import difflib

        close = difflib.get_close_matches(name, eps, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown command {name!r}.{hint} Commands: {', '.join(eps)}. "
                          "A plugin distribution may provide it: pip install it.")
    ep = eps[name]
    try:
        command = ep.load()
    except Exception as exc:  # a broken plugin command must not hide the others
        dist = ep.dist.name if ep.dist is not None else "?"
        raise ConfigError(f"command {name!r} from {dist} failed to load ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(command, Command):
        raise ConfigError(f"entry point {ep.value!r} of command {name!r} is not an unfog.commands.Command.")
    return command


def available() -> list[Command]:
    """Every command that loads, for ``unfog --help``; the others are reported as a warning."""
    out = []
    for name in entry_points():
        try:
            out.append(load(name))
        except ConfigError as exc:
            warnings.warn(str(exc), RuntimeWarning, stacklevel=2)
    return out


def execute(command: Command, args: list[str]) -> int:
    """Run ``command`` with the command-line ``args``; return the exit status."""
    if command.config is None:
        try:
            return int(command.run(args) or 0)
        except UnfogError as exc:
            fail(exc)
    return run_hydra(command, args)


