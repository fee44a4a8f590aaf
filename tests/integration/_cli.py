"""Run the real ``unfog`` command in a subprocess, never attached to a terminal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TINY = [
    "backbone=unet_tiny", "trainer=debug", "logger=csv", "data.batch_size=32",
    "sampling.num_samples=20", "sampler.steps=5",
]


def unfog_cmd() -> list[str]:
    exe = shutil.which("unfog", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "unfog.cli"]


def run(*args: str, cwd: Path, env: dict[str, str | None] | None = None, check: bool = True,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``unfog ARGS`` in ``cwd``; ``env`` entries set to None are removed from the environment."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    proc = subprocess.run([*unfog_cmd(), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"unfog {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
