"""``unfog plugins``: plugin distributions, versions and what each provides."""

from __future__ import annotations

from unfog.commands.base import Command


def _command(args: list[str]) -> int:
    import unfog

    for p in unfog.plugins():
        status = f"FAILED: {p.error}" if p.error else ", ".join(f"{k}/{n}" for k, n in p.provides) or "nothing"
        print(f"{p.distribution or '?'} {p.version or ''}  [{p.name} -> {p.module}]  {status}")
    return 0


COMMAND = Command(name="plugins", summary="list plugin distributions, versions and what each provides",
                  run=_command)
