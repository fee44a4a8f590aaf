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


def test_an_installed_plugin_adds_a_command_run_like_unfogs_own(installed: None, tmp_path: Path) -> None:
    assert "schedule-table" in run("--help", cwd=tmp_path).stdout
    out = run("schedule-table", "schedule=cosine", "points=3", cwd=tmp_path)
    assert out.stdout.splitlines()[0] == "t,alpha,sigma,log_snr" and len(out.stdout.splitlines()) == 4
    tables = list((tmp_path / "outputs" / "schedule-table").glob("*/*/table.csv"))  # unfog's run folders
    assert len(tables) == 1 and (tables[0].parent / ".hydra" / "config.yaml").is_file()
    sweep = run("schedule-table", "-m", "schedule=cosine,sqrt", "points=2", cwd=tmp_path)
    assert sweep.returncode == 0 and len(list((tmp_path / "multirun" / "schedule-table").rglob("table.csv"))) == 2
    bad = run("schedule-table", "points=1", cwd=tmp_path, check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip() == "unfog: error: points=1: give at least 2 times (t = 0 and t = 1)."
    typo = run("schedule-table", "schedule=cosin", cwd=tmp_path, check=False)
    assert typo.returncode == 1 and "Traceback" not in typo.stderr
    assert "there is no option 'schedule/cosin'" in typo.stderr
