"""``unfog schedule-table``: a command this plugin adds, run by unfog like its own commands."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from unfog.commands.base import Command
from unfog.config import build
from unfog.errors import ConfigError


def table(cfg: Any, out_dir: Path) -> Path:
    """Write ``table.csv`` (t, α, σ, log-SNR) for ``cfg.schedule`` at ``cfg.points`` times; print it."""
    if int(cfg.points) < 2:
        raise ConfigError(f"points={cfg.points}: give at least 2 times (t = 0 and t = 1).")
    schedule = build("schedule", cfg.schedule)
    t = torch.linspace(0, 1, int(cfg.points), dtype=torch.float64)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    rows = ["t,alpha,sigma,log_snr"]
    for ti, a, s in zip(t.tolist(), alpha.tolist(), sigma.tolist()):
        snr = 2 * (math.log(a) - math.log(s)) if a > 0 and s > 0 else (math.inf if s == 0 else -math.inf)
        rows.append(f"{ti:.4f},{a:.6f},{s:.6f},{snr:.4f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.csv").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return out_dir / "table.csv"


COMMAND = Command(name="schedule-table", summary="print α(t), σ(t) and log-SNR of a schedule",
                  run=table, config="schedule_table", config_dir=Path(__file__).resolve().parent / "conf",
                  usage="unfog schedule-table schedule=sqrt points=11")
