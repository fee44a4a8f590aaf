"""Lightning callbacks and plugins: sample grids while training, atomic checkpoints."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from unfog.audio import is_audio, write_wavs
from unfog.images import picture, save_png
from unfog.loggers import log_picture
from unfog.model import Guidance
from unfog.protocols import Sampler
from unfog.sampling import default_values, gather, generate, select, shard


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end, draws a fixed-seed grid with
    the EMA weights, saves it as ``samples/step_NNNNNNN.png`` (sound: ``step_NNNNNNN/*.wav``)
    and logs it. Conditioners
    without values of their own (captions, images to upscale) take them from ``examples``,
    fixed rows of the training data."""

    def __init__(self, sampler: Sampler, out_dir: Path, data_shape: tuple[int, ...],
                 data_range: tuple[float, float] | None, every_n_steps: int = 1000, num_samples: int = 64,
                 seed: int = 0, guidance: Guidance = 1.0, clip: bool = True, batch_size: int = 256,
                 guidance_rescale: float = 0.0, guidance_interval: Sequence[float] | None = None,
                 examples: Mapping[str, Any] | None = None, sample_rate: int | None = None) -> None:
        self.sampler = sampler
        self.out_dir = Path(out_dir)
        self.data_shape = data_shape
        self.data_range = data_range
        self.every = every_n_steps
        self.num_samples = num_samples
        self.seed = seed
        self.guidance = guidance
        self.guidance_rescale = guidance_rescale
        self.guidance_interval = guidance_interval
        self.examples = examples
        self.sample_rate = sample_rate
        self.clip = data_range if clip else None
        self.batch_size = batch_size
        self.last_step = -1
        self.last_path: Path | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.draw(trainer, pl_module)

    def check(self, model: Any) -> None:
        """Encode the grid's conditioning for two samples now, so a grid that cannot be drawn
        fails before training rather than at its first step."""
        if self.num_samples <= 0 or not len(model.conditioners):
            return
        n = min(2, self.num_samples)
        values = select(default_values(model, self.num_samples, self.examples), range(n))
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
        model = pl_module.ema.module
        values = default_values(model, n, examples) if len(model.conditioners) else None
        indices = shard(n, trainer.global_rank, trainer.world_size)
        part = generate(model, pl_module.schedule, self.sampler, pl_module.prediction, self.data_shape,
                        indices, seed=seed, values=select(values, indices), guidance=self.guidance,
                        clip=self.clip, batch_size=batch_size or self.batch_size, device=pl_module.device,
                        sigma_data=pl_module.sigma_data, guidance_rescale=self.guidance_rescale,
                        guidance_interval=self.guidance_interval)
        return gather(part, indices, n), values

    def draw(self, trainer: L.Trainer, pl_module: Any) -> Path | None:
        """Draw the grid for the current step, shared out across processes; rank 0 saves
        ``step_NNNNNNN.png`` and ``.npz`` and logs the picture. Every sample has its own noise
        stream, so the grid is the same for any number of processes."""
        step = trainer.global_step
        if step == self.last_step or self.num_samples <= 0:
            return self.last_path
        self.last_step = step
        samples, _ = self.samples(trainer, pl_module, self.num_samples, self.seed, self.examples)
        if not trainer.is_global_zero:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(self.out_dir / f"step_{step:07d}.npz", samples=samples.numpy())
        if self.sample_rate and is_audio(self.data_shape):  # sound: one WAV per sample
            write_wavs(samples, self.sample_rate, self.out_dir / f"step_{step:07d}")
        nrow = _classes(pl_module.ema.module) or None
        pic = picture(samples, nrow, self.data_range)
        if pic is None:
            return None
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
        from unfog.evaluation import set_references

        if trainer.is_global_zero and self.reference is not None:
            set_references(self.metrics, *self.reference)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: Any) -> dict[str, dict[str, float]]:
        """Score the current EMA model; every process returns the first process's results."""
        import json

        from unfog.evaluation import flat, score
        from unfog.run import captions_of, labels_of

        step = trainer.global_step
        if step == self.last_step or self.num_samples <= 0:
            return self.results
        self.last_step = step
        samples, values = self.grid.samples(trainer, pl_module, self.num_samples, self.seed, self.examples,
                                            self.batch_size)
        results: dict[str, dict[str, float]] = {}
        if trainer.is_global_zero:
            model = pl_module.ema.module
            results = score(self.metrics, samples, labels_of(model, values), captions_of(model, values))
            if trainer.logger:
                trainer.logger.log_metrics(flat(results, "eval/"), step=step)
            self.out_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.out_file, "a") as f:
                f.write(json.dumps({"step": step, "num_samples": self.num_samples, "results": results}) + "\n")
        results = trainer.strategy.broadcast(results, src=0)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in flat(results, "eval/").items()})
        self.results = results
        return results


def _classes(model: Any) -> int | None:
    for c in model.conditioners.values():
        k = getattr(c, "num_classes", None)
        if k:
            return int(k)
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place, so a run killed
    mid-write never leaves a truncated checkpoint behind."""

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
        finally:
            tmp.unlink(missing_ok=True)


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run, counted in optimizer steps up to ``trainer.max_steps``, so
    its ETA is the time to the end of training (Lightning's own bar restarts every epoch).
    A resumed run starts the bar at the restored step."""

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.train_progress_bar.reset(total=total)
        self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("train")

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
