"""The ``unfog`` command: a dispatcher over the commands that entry points of the group
``unfog.commands`` name (unfog's own and plugins'); see :mod:`unfog.commands`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: unfog COMMAND [OVERRIDES...]

commands:
{commands}

Overrides are Hydra's: group=option, key=value, -m for sweeps, --help for the config help.
Kinds of component (unfog list KIND): {kinds}.
"""


def usage() -> str:
    """The help text, with every installed command."""
    from unfog.commands import available
    from unfog.registry import KINDS

    rows = []
    for command in available():
        rows.append(f"  {command.name:<17} {command.summary}")
        if command.usage:
            rows.append(f"  {'':<17}   e.g. {command.usage}")
    return USAGE.format(commands="\n".join(rows), kinds=", ".join(KINDS))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unfog`` console script."""
    from unfog.commands import execute, fail, load
    from unfog.errors import ConfigError

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] == "--version":
        import unfog

        print(f"unfog {unfog.__version__}")
        return 0
    try:
        command = load(args[0])
    except ConfigError as exc:
        fail(exc, status=2)
    return execute(command, args[1:])


if __name__ == "__main__":
    sys.exit(main())
