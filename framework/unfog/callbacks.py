"""Lightning callbacks and plugins: sample grids and metrics while training, checkpoints that
are written whole or not at all, a clean stop on Ctrl-C or SIGTERM, one progress bar."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from unfog.audio import is_audio, write_wavs
from unfog.errors import CheckpointError
from unfog.evaluation import flat, score, set_references
from unfog.images import picture, save_png, visible
from unfog.loggers import log_picture
from unfog.pipeline import DiffusionPipeline
from unfog.protocols import Sampler
from unfog.sampling import captions_of, default_values, gather, labels_of, select, shard
from unfog.schemas import SamplingSettings


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end, draws a fixed-seed grid with the
    EMA weights (``settings``: guidance, seed, clipping, batch size), saves it as
    ``samples/step_NNNNNNN.png`` — small images enlarged without smoothing to at least 256
    pixels across — with the raw samples in ``.npz`` (sound: ``step_NNNNNNN/*.wav``) and logs
    it. Conditioners without values of their own (captions, images to upscale) take them from
    ``examples``, fixed rows of the training data."""

    def __init__(self, sampler: Sampler, out_dir: Path, settings: SamplingSettings, every_n_steps: int = 1000,
                 num_samples: int = 64, examples: Mapping[str, Any] | None = None) -> None:
        self.sampler = sampler
        self.out_dir = Path(out_dir)
        self.settings = settings
        self.every = every_n_steps
        self.num_samples = num_samples
        self.examples = examples
        self.last_step = -1
        self.last_path: Path | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not interrupted(trainer):
            self.draw(trainer, pl_module)

    def check(self, pipeline: DiffusionPipeline) -> None:
        """Check the settings and encode the grid's conditioning for two samples now, so a grid
        that cannot be drawn fails before training rather than at its first step."""
        pipeline.check(self.settings)
        model = pipeline.model
        if self.num_samples <= 0 or not len(model.conditioners):
            return
        n = min(2, self.num_samples)
        values = select(default_values(model.conditioners, self.num_samples, self.examples), range(n))
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model.encode(values, n)
        finally:
            model.train(was_training)

    def samples(self, trainer: L.Trainer, pl_module: Any, n: int, seed: int, examples: Mapping[str, Any] | None,
                batch_size: int | None = None) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """``n`` samples of the EMA model with this grid's sampler and guidance, drawn in shares
        by every process and gathered on each, and the conditioning values they were drawn for
        (labels in turn; other fields from the rows ``examples``)."""
        pipeline = DiffusionPipeline.from_module(pl_module)
        conditioners = pipeline.conditioners
        values = default_values(conditioners, n, examples) if len(conditioners) else None
        indices = shard(n, trainer.global_rank, trainer.world_size)
        settings = dataclasses.replace(self.settings, seed=seed, batch_size=batch_size or self.settings.batch_size)
        part = pipeline.generate(self.sampler, indices, select(values, indices), settings, device=pl_module.device)
        return gather(part, indices, n), values

    def draw(self, trainer: L.Trainer, pl_module: Any) -> Path | None:
        """Draw the grid for the current step, shared out across processes; rank 0 saves
        ``step_NNNNNNN.png`` and ``.npz`` and logs the picture. Every sample has its own noise
        stream, so the grid is the same for any number of processes."""
        step = trainer.global_step
        if step == self.last_step or self.num_samples <= 0:
            return self.last_path
        self.last_step = step
        samples, _ = self.samples(trainer, pl_module, self.num_samples, self.settings.seed, self.examples)
        if not trainer.is_global_zero:
            return None
        pipeline = DiffusionPipeline.from_module(pl_module)  # what the samples are: shape, range, classes
        self.out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(self.out_dir / f"step_{step:07d}.npz", samples=samples.numpy())
        if pipeline.sample_rate and is_audio(pipeline.data_shape):  # sound: one WAV per sample
            write_wavs(samples, pipeline.sample_rate, self.out_dir / f"step_{step:07d}")
        pic = picture(samples, pipeline.num_classes, pipeline.data_range)
        if pic is None:
            return None
        pic = visible(pic)
        self.last_path = save_png(pic, self.out_dir / f"step_{step:07d}.png")
        if trainer.logger:
            log_picture(trainer.logger, "samples", pic, step)
        return self.last_path


class MetricCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end, scores ``num_samples`` samples of
    the EMA model (drawn with the sample grid's sampler and guidance, shared out across
    processes) with ``metrics``, logs them as ``eval/METRIC/VALUE`` and appends them to
    ``evaluation.jsonl``. Metrics that take a reference get the training data once, on the
    first process, before training starts."""

    def __init__(self, metrics: Mapping[str, Any], grid: SampleGrid, out_file: Path, every_n_steps: int = 1000,
                 num_samples: int = 256, seed: int = 0, examples: Mapping[str, Any] | None = None,
                 reference: tuple[Any, Mapping[str, Any]] | None = None, batch_size: int = 256) -> None:
        self.metrics = dict(metrics)
        self.grid = grid
        self.out_file = Path(out_file)
        self.every = every_n_steps
        self.num_samples = num_samples
        self.seed = seed
        self.examples = examples
        self.reference = reference
        self.batch_size = batch_size
        self.last_step = -1
        self.results: dict[str, dict[str, float]] = {}

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if trainer.is_global_zero and self.reference is not None:
            set_references(self.metrics, *self.reference)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not interrupted(trainer):
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: Any) -> dict[str, dict[str, float]]:
        """Score the current EMA model; every process returns the first process's results."""
        import json

        step = trainer.global_step
        if step == self.last_step or self.num_samples <= 0:
            return self.results
        self.last_step = step
        samples, values = self.grid.samples(trainer, pl_module, self.num_samples, self.seed, self.examples,
                                            self.batch_size)
        results: dict[str, dict[str, float]] = {}
        if trainer.is_global_zero:
            conditioners = pl_module.ema.module.conditioners
            results = score(self.metrics, samples, labels_of(conditioners, values), captions_of(conditioners, values))
            if trainer.logger:
                trainer.logger.log_metrics(flat(results, "eval/"), step=step)
            self.out_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.out_file, "a") as f:
                f.write(json.dumps({"step": step, "num_samples": self.num_samples, "results": results}) + "\n")
        results = trainer.strategy.broadcast(results, src=0)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in flat(results, "eval/").items()})
        self.results = results
        return results


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place, so a run killed
    mid-write never leaves a truncated checkpoint behind, and a write that fails (a full disk)
    leaves the previous checkpoint as it was and says so."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, path)
        except OSError as exc:
            kept = f"the previous {path.name} is intact" if path.exists() else f"no earlier {path.name} exists"
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            reason = "the disk is full" if full else f"{type(exc).__name__}: {exc.strerror or exc}"
            raise CheckpointError(
                f"could not write the checkpoint {path} at step {checkpoint.get('global_step', '?')} ({reason}); "
                f"{kept}. {'Free some space' if full else 'Fix the cause'}, then resume with ckpt_path={path}."
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)


class GracefulStop(L.Callback):
    """Ctrl-C (SIGINT) or SIGTERM (a cluster's notice before it ends a job) stops training at
    the end of the current step, where model, EMA, optimizer and data order agree: the
    checkpoint is written there, training ends, and :attr:`signal_number` says why. A second
    signal of the same kind while that happens interrupts at once (the previous checkpoint
    stays intact). Under DDP every process stops at the same step. A signal the process was
    started with ignored (SIGINT in a background job) stays ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = Path(checkpoint)
        self.signal_number: int | None = None
        self.step: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        # installed after Lightning's own SIGTERM handler (set up before this hook), which would
        # otherwise end the run with an exception before the step is done
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in self.SIGNALS:
            if signal.getsignal(sig) != signal.SIG_IGN:  # an ignored signal stays ignored, as Python leaves it
                self._previous[sig] = signal.signal(sig, self._notice)

    def _notice(self, sig: int, frame: Any) -> None:
        if self.signal_number is not None:  # asked twice: stop now
            self._restore()
            signal.raise_signal(sig)
            return
        self.signal_number = sig
        print(f"\nunfog: {signal.Signals(sig).name} received; stopping after this step and writing "
              f"{self.checkpoint} ...", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        asked = self.signal_number is not None
        if trainer.world_size > 1:
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        if asked:
            if self.signal_number is None:
                self.signal_number = signal.SIGTERM  # another process got it
            trainer.save_checkpoint(self.checkpoint, weights_only=False)
            self.step = trainer.global_step
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def interrupted(trainer: L.Trainer) -> bool:
    """Whether a :class:`GracefulStop` of this trainer is stopping it on a signal."""
    return any(isinstance(cb, GracefulStop) and cb.signal_number is not None for cb in trainer.callbacks)


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run, counted in optimizer steps up to ``trainer.max_steps``, so
    its ETA is the time to the end of training (Lightning's own bar restarts every epoch).
    A resumed run starts the bar at the restored step."""

    @property
    def train_description(self) -> str:
        return "train"

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        bar = self.init_train_tqdm()
        bar.total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        bar.initial = bar.n = trainer.global_step
        bar.refresh()
        self.train_progress_bar = bar

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        n = trainer.global_step
        if bar is not None and self._should_update(n, bar.total or n + 1):
            bar.n = n
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
