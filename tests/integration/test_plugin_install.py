"""A third-party plugin installed with pip becomes selectable from the CLI with no other step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cli import TINY, run

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "unfog-sqrt-schedule"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True,
                   capture_output=True, text=True)


@pytest.fixture(scope="module")
def installed() -> None:
    _pip("install", "--no-deps", "--no-build-isolation", str(EXAMPLE))
    yield
    _pip("uninstall", "-y", "unfog-sqrt-schedule")


def test_installed_plugin_is_listed_and_trains(installed: None, tmp_path: Path) -> None:
    assert "sqrt" in run("list", "schedule", cwd=tmp_path).stdout
    assert "unfog-sqrt-schedule 0.1.0" in run("plugins", cwd=tmp_path).stdout
    run("train", *TINY, "schedule=sqrt", "schedule.num_timesteps=200", "trainer.max_steps=2",
        f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    meta = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["unfog"]
    assert meta["config"]["schedule"] == {"_name_": "sqrt", "num_timesteps": 200, "s": 1e-4}
    assert meta["versions"]["unfog-sqrt-schedule"] == "0.1.0"


def test_plugin_passes_its_own_contract_tests(installed: None) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                          capture_output=True, text=True, cwd=EXAMPLE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
