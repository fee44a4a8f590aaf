"""A run interrupted any number of times, at any step, by a kill, Ctrl-C or SIGTERM, resumes to
exactly the run that was never interrupted — EMA included; a full disk loses nothing; a run
that is already done says so and exits 0."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from _cli import TINY, run, unfog_cmd
from hydra import compose, initialize_config_dir

from unfog.commands import conf_dir
from unfog.commands.train import TrainRecipe, train
from unfog.config import register_configs
from unfog.errors import CheckpointError, Interrupted

SETUP = ["trainer=debug", "logger=csv", "sampling.num_samples=0", "backbone=unet_tiny", "backbone.dropout=0.1",
         "conditioner=class_label", "conditioners.class_label.dropout=0.3", "data.batch_size=8",
         "optim.warmup_steps=3", "ema.decay=0.9"]


def _cfg(*overrides: str) -> Any:
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=[*SETUP, *overrides])


class Killed(BaseException):
    """Stands for SIGKILL: nothing is saved, nothing is cleaned up by unfog."""


class KillAt(L.Callback):
    """Ends the process's work abruptly at optimizer step ``step``, either in the middle of the
    step (after backward, before the optimizer moves) or after it (checkpoints of that step written)."""

    def __init__(self, step: int, mid_step: bool) -> None:
        self.step, self.mid_step = step, mid_step

    def on_before_optimizer_step(self, trainer: L.Trainer, *args: Any) -> None:
        if self.mid_step and trainer.global_step + 1 == self.step:
            raise Killed

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not self.mid_step and trainer.global_step == self.step:
            raise Killed


ORIGINAL_CALLBACKS = TrainRecipe.callbacks


def _with_callback(monkeypatch: pytest.MonkeyPatch, callback: L.Callback | None) -> None:
    original = ORIGINAL_CALLBACKS

    def callbacks(self: TrainRecipe) -> None:
        original(self)
        if callback is not None:
            self.callback_list.append(callback)

    monkeypatch.setattr(TrainRecipe, "callbacks", callbacks)


def _losses(run_dir: Path) -> dict[int, str]:
    import csv

    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {int(r["step"]): r["train/loss"] for r in rows}


def _state(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def _assert_same_run(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():  # model, EMA and the counters, bit for bit
        assert torch.equal(value, b["state_dict"][key]), key
    for i, s in a["optimizer_states"][0]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s[name], b["optimizer_states"][0]["state"][i][name]), (i, name)


def test_many_kills_at_arbitrary_steps_resume_to_the_uninterrupted_run(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    steps, every = 30, 4
    whole = train(_cfg(f"trainer.max_steps={steps}", f"checkpoint.every_n_steps={every}"), tmp_path / "whole")
    rng = random.Random(13)
    kills = sorted(rng.sample(range(1, steps), 12))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    attempts = 0
    for kill in kills:
        _with_callback(monkeypatch, KillAt(kill, mid_step=rng.random() < 0.5))
        resume = [f"ckpt_path={last}"] if last.exists() else []
        with pytest.raises(Killed):
            train(_cfg(f"trainer.max_steps={steps}", f"checkpoint.every_n_steps={every}", *resume),
                  tmp_path / "run")
        attempts += 1
        assert not list(last.parent.glob(".*.tmp-*")), "a temporary checkpoint was left behind"
    _with_callback(monkeypatch, None)
    done = train(_cfg(f"trainer.max_steps={steps}", f"checkpoint.every_n_steps={every}", f"ckpt_path={last}"),
                 tmp_path / "run")
    assert attempts == 12 and done.steps == steps
    a, b = _state(whole.checkpoint), _state(done.checkpoint)
    assert int(b["state_dict"]["ema.updates"]) == steps  # one EMA update per optimizer step, however resumed
    _assert_same_run(a, b)
    # the log resumed in the same folder is the uninterrupted run's log: every step once, same values
    assert _losses(tmp_path / "run") == _losses(whole.run_dir) and len(_losses(whole.run_dir)) == steps


@pytest.fixture
def terminal_sigint() -> Any:
    """SIGINT handled as in a terminal, whatever this process was started with (a background job
    starts with SIGINT ignored, and then a Ctrl-C is rightly ignored too)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigterm_and_ctrl_c_write_a_checkpoint_of_the_step_and_resume_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminal_sigint: None) -> None:
    class Signal(L.Callback):
        def __init__(self, step: int, sig: int) -> None:
            self.step, self.sig = step, sig

        def on_before_optimizer_step(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step + 1 == self.step:  # mid-step: the step still completes
                os.kill(os.getpid(), self.sig)

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    whole = train(_cfg("trainer.max_steps=12", "checkpoint.every_n_steps=100"), tmp_path / "whole")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for step, sig in ((5, signal.SIGTERM), (9, signal.SIGINT)):
        _with_callback(monkeypatch, Signal(step, sig))
        resume = [f"ckpt_path={last}"] if last.exists() else []
        with pytest.raises(Interrupted, match=f"stopped by {signal.Signals(sig).name} at step {step}") as err:
            train(_cfg("trainer.max_steps=12", "checkpoint.every_n_steps=100", *resume), tmp_path / "run")
        assert err.value.signal_number == sig and _state(last)["global_step"] == step
        assert {s: signal.getsignal(s) for s in before} == before  # the handlers are given back
    _with_callback(monkeypatch, None)
    done = train(_cfg("trainer.max_steps=12", "checkpoint.every_n_steps=100", f"ckpt_path={last}"), tmp_path / "run")
    _assert_same_run(_state(whole.checkpoint), _state(done.checkpoint))


def test_a_signal_the_process_ignores_stays_ignored() -> None:
    from unfog.callbacks import GracefulStop

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's SIGINT
    try:
        stop = GracefulStop(Path("last.ckpt"))
        stop.on_train_start(None, None)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._notice
        stop.on_train_end(None, None)
        assert signal.getsignal(signal.SIGTERM) != stop._notice
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_says_so(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real_save, calls = torch.save, []

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: half written, then the disk is full
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError) as err:
        train(_cfg("trainer.max_steps=8", "checkpoint.every_n_steps=2"), tmp_path)
    message = str(err.value)
    assert "the disk is full" in message and "the previous last.ckpt is intact" in message and "ckpt_path=" in message
    monkeypatch.setattr(torch, "save", real_save)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert _state(last)["global_step"] == 2 and not list(last.parent.glob(".*.tmp-*"))


def test_resuming_a_finished_run_has_nothing_to_do_and_exits_0(tmp_path: Path) -> None:
    first = run("train", *TINY, "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert "unfog: trained 3 steps" in first.stdout
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    again = run("train", *TINY, "trainer.max_steps=3", f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'b'}",
                cwd=tmp_path)
    assert again.returncode == 0
    assert f"unfog: nothing to do: {last} is at step 3, and trainer.max_steps=3" in again.stdout
    assert not (tmp_path / "b" / "checkpoints").exists()


def _start(tmp: Path, *overrides: str) -> subprocess.Popen[str]:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*unfog_cmd(), "train", *TINY, *overrides, f"hydra.run.dir={tmp}"], cwd=tmp.parent,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, preexec_fn=_as_in_a_terminal)


def _as_in_a_terminal() -> None:
    """In the child: SIGINT delivered, as to a command started in a terminal (a background job's
    children inherit it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_step(proc: subprocess.Popen[str], ckpt: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists():
            try:
                if torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"] >= step:
                    return
            except Exception:  # being replaced right now
                pass
        time.sleep(0.05)
    raise AssertionError(f"the run never reached step {step}: {proc.poll()}")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_real_command_stops_it_cleanly(tmp_path: Path, sig: int) -> None:
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "trainer.max_steps=100000", "checkpoint.every_n_steps=5")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    _wait_for_step(proc, ckpt, 5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (out, err)
    assert "Traceback" not in err and f"stopped by {signal.Signals(sig).name} at step" in err
    step = _state(ckpt)["global_step"]
    resumed = run("train", *TINY, f"trainer.max_steps={step + 2}", f"ckpt_path={ckpt}",
                  f"hydra.run.dir={tmp_path / 'more'}", cwd=tmp_path)
    assert f"unfog: trained {step + 2} steps" in resumed.stdout


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_at_most_the_steps_since_the_last_checkpoint(tmp_path: Path) -> None:
    steps, every, rng = 40, 3, random.Random(5)
    one_thread = {"OMP_NUM_THREADS": "1"}  # as _start: CPU kernels round differently with other thread counts
    whole = run("train", *TINY, f"trainer.max_steps={steps}", f"checkpoint.every_n_steps={every}",
                f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path, env=one_thread)
    assert whole.returncode == 0
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    for _ in range(3):
        resume = [f"ckpt_path={ckpt}"] if ckpt.exists() else []
        proc = _start(run_dir, f"trainer.max_steps={steps}", f"checkpoint.every_n_steps={every}", *resume)
        _wait_for_step(proc, ckpt, (_state(ckpt)["global_step"] if ckpt.exists() else 0) + every)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.kill()
        proc.communicate()
    run("train", *TINY, f"trainer.max_steps={steps}", f"checkpoint.every_n_steps={every}", f"ckpt_path={ckpt}",
        f"hydra.run.dir={run_dir}", cwd=tmp_path, env=one_thread)
    _assert_same_run(_state(tmp_path / "whole" / "checkpoints" / "last.ckpt"), _state(ckpt))


if sys.platform == "win32":  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="POSIX signals")
