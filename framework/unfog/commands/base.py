"""What every command shares: the :class:`Command` object an entry point names, where unfog's
configs are, and how a command ends on an error."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unfog.errors import Interrupted, UnfogError


@dataclass(frozen=True)
class Command:
    """One ``unfog NAME`` command.

    Args:
        name: what follows ``unfog`` on the command line.
        summary: one line for ``unfog --help``.
        run: with a ``config``, ``run(cfg, out_dir)`` does the work (its return value goes to a
            sweeper under ``-m``); without one, ``run(args)`` gets the raw arguments and returns
            the exit status.
        config: the Hydra primary config's name; None for a command with plain arguments.
        config_dir: the folder holding that config (None: unfog's own ``conf/``).
        schema: the config's schema dataclass, whose declared ranges are checked first.
        output: the folder under ``outputs/`` (and ``multirun/``) runs go to (default: ``name``).
        usage: an example for ``unfog --help``.
        metric_lists: ``metric=a,b`` means both metrics (``metric=[a,b]``), not a sweep.
    """

    name: str
    summary: str
    run: Callable[..., Any]
    config: str | None = None
    config_dir: str | Path | None = None
    schema: type | None = None
    output: str | None = None
    usage: str = ""
    metric_lists: bool = False


def conf_dir() -> Path:
    """The folder of unfog's Hydra configs: inside the installed package, or ``conf/`` of a checkout."""
    import unfog

    here = Path(unfog.__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"unfog's configs were not found next to {here}; reinstall unfog.")


def fail(exc: BaseException, status: int = 1) -> None:
    """End the command with ``unfog: error: MESSAGE`` on stderr."""
    print(f"unfog: error: {exc}", file=sys.stderr)
    raise SystemExit(status)


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; an unfog error ends the command with its message (an interrupted run
    with 128 + the signal's number, as shells report a process a signal ended)."""
    try:
        return fn(*args)
    except Interrupted as exc:
        print(f"unfog: {exc}", file=sys.stderr)
        raise SystemExit(128 + exc.signal_number) from None
    except UnfogError as exc:
        fail(exc)


def split_metrics(overrides: Sequence[str]) -> list[str]:
    """``metric=fid,kid`` means both metrics (``metric=[fid,kid]``) unless ``-m`` asks for a sweep."""
    if "-m" in overrides or "--multirun" in overrides:
        return list(overrides)
    return [f"metric=[{o[len('metric='):]}]" if o.startswith("metric=") and "," in o and "[" not in o else o
            for o in overrides]
