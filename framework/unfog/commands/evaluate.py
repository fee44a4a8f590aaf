"""``unfog evaluate``: score samples from a checkpoint and record the protocol that made the numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unfog.commands.base import Command
from unfog.evaluation import evaluate, table


def _command(cfg: Any, out_dir: Path) -> None:
    from unfog.commands.base import call

    result = call(evaluate, cfg, out_dir)
    print(table(result.results))
    print(f"unfog: scored {cfg.num_samples} samples; results and protocol in {result.path}")


COMMAND = Command(
    name="evaluate", summary="score samples from a checkpoint and record the protocol",
    run=_command, config="evaluate", metric_lists=True,  # evaluate() checks its config (for Python callers too)
    usage="unfog evaluate checkpoint=PATH metric=fid,kid num_samples=10000 sampler=ddim",
)
