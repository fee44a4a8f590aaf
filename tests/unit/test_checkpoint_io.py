"""A process killed while it writes a checkpoint leaves the previous one intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

WRITER = """
import sys, torch
from unfog.callbacks import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
big = torch.zeros(40_000_000)  # 160 MB: each write takes a while
step = 0
while True:
    step += 1
    io.save_checkpoint({"step": step, "weights": big + step}, path)
"""


def test_killed_mid_write_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    try:
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:  # one complete checkpoint
            time.sleep(0.01)
        assert path.exists(), "the writer never finished a checkpoint"
        while not list(tmp_path.glob(".last.ckpt.tmp-*")) and time.monotonic() < deadline:  # mid-write
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] >= 1 and float(ckpt["weights"][0]) == ckpt["step"]
