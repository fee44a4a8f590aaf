"""``unfog train``: a recipe that builds one training run step by step — check, data, model,
loggers, callbacks — and fits it."""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unfog.building import auto_guidance, build_model, check_data, resolve, validate
from unfog.checkpoints import KEY, read_checkpoint
from unfog.commands.base import Command
from unfog.config import NAME_KEY, build, plain
from unfog.errors import ConfigError, Interrupted
from unfog.latents import (
    EncodedOnTheFly,
    LatentDataset,
    LatentSpace,
    cache_root,
    latent_cache,
    latent_space,
    normalization,
    on_the_fly_statistics,
)
from unfog.protocols import Sound
from unfog.schemas import SamplingSettings, TrainConfig, check_config
from unfog.util import resolve_device, versions

log = logging.getLogger("unfog")

COMPONENT_KEYS = ("backbone", "conditioners", "schedule", "dataset", "prediction", "autoencoder")
LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning")


@dataclass
class TrainResult:
    """Where a finished (or already finished) training run left its outputs."""

    run_dir: Path
    checkpoint: Path
    samples: Path | None
    steps: int
    seconds: float
    final_loss: float | None
    rank: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    nothing_to_do: bool = False

    def objective(self, name: str) -> float:
        """The final value of the logged metric ``name`` (what a sweeper optimizes)."""
        if name not in self.metrics:
            raise ConfigError(
                f"objective={name} was not logged by this run; logged metrics: {sorted(self.metrics) or 'none'}."
            )
        return self.metrics[name]


class TrainRecipe:
    """One training run of a composed config, writing into ``run_dir``.

    :meth:`run` goes through the steps in order, each building on the last: :meth:`check`
    (nothing built yet; a resumed run that already reached ``max_steps`` stops here),
    :meth:`data` (the dataset, and what ``auto`` entries choose for it), :meth:`model`,
    :meth:`loggers`, :meth:`callbacks`, then :meth:`fit`. ``sweep`` names the sweep and
    this job for the logger.
    """

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, sweep: Mapping[str, str] | None = None) -> None:
        self.cfg: dict[str, Any] = plain(cfg)
        self.run_dir = Path(run_dir)
        self.sweep = sweep
        self.choices: dict[str, str] = {}
        self.resumed: dict[str, Any] = {}

    def run(self) -> TrainResult:
        """Check, build and fit; return where the run left its outputs."""
        done = self.check()
        if done is not None:
            return done
        self.data()
        self.model()
        self.loggers()
        self.callbacks()
        return self.fit()

    # ------------------------------------------------------------------------------ check

    def check(self) -> TrainResult | None:
        """Validate everything that needs no data; read the checkpoint to resume from. A run that
        already reached ``trainer.max_steps`` returns its result here (nothing to do)."""
        check_config(self.cfg, TrainConfig)
        self.entries = validate(self.cfg)
        ckpt_path = self.cfg["ckpt_path"]
        if not ckpt_path:
            return None
        ckpt = read_checkpoint(ckpt_path, what="ckpt_path", mmap=True)
        self.resumed = {"meta": ckpt[KEY], "step": int(ckpt.get("global_step", 0)),
                        "shapes": {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}}
        max_steps = int(self.cfg["trainer"].get("max_steps") or -1)
        if 0 < max_steps <= self.resumed["step"]:
            return self._nothing_to_do(Path(ckpt_path), max_steps)
        return None

    def _nothing_to_do(self, ckpt: Path, max_steps: int) -> TrainResult:
        step = self.resumed["step"]
        metrics = dict(self.resumed["meta"].get("metrics") or {})
        if _is_main_process():
            print(f"unfog: nothing to do: {ckpt} is at step {step}, and trainer.max_steps={max_steps}. "
                  f"Raise trainer.max_steps to train further.")
        loss = metrics.get("train/loss")
        return TrainResult(self.run_dir, ckpt, None, step, 0.0, loss, 0, metrics, nothing_to_do=True)

    # ------------------------------------------------------------------------------- data

    def data(self) -> None:
        """Seed everything, build the dataset (and, for a latent model, its cached latents), let
        ``auto`` entries choose for it, and check that the backbone and conditioners fit it."""
        import lightning as L

        _quiet(self.cfg.get("verbose", False))
        L.seed_everything(self.cfg["seed"], workers=True, verbose=False)
        self.pixels = build("dataset", self.cfg["dataset"])
        with torch.random.fork_rng(devices=[]):  # building or reading a cache leaves the model's init as it was
            self.latent, self.dataset = self.first_stage(self.pixels)
        self.choices = {**self.choices, **resolve(self.cfg, self.dataset)}
        self.entries = validate(self.cfg)  # what auto chose: its routes, and its distributions for the versions
        check_data(self.cfg, self.dataset)

    def first_stage(self, pixels: Any) -> tuple[LatentSpace | None, Any]:
        """The latent space of the config's ``autoencoder`` and the data the model trains on: the
        cached posteriors of ``pixels`` (built once, see :mod:`unfog.latents`), or the pixels
        encoded every batch with ``latents.cache=false``; ``(None, pixels)`` in pixel space."""
        cfg, lat = self.cfg, self.cfg["latents"]
        space = latent_space(cfg.get("autoencoder"), tuple(pixels.data_shape))
        if space is None:
            return None, pixels
        device = resolve_device(lat["device"])
        main = _is_main_process()
        log = print if main else (lambda *a, **k: None)
        if getattr(space.autoencoder, "untrained", False):
            log(f"unfog: note: autoencoder {space.name} has random weights (no autoencoder.weights): a latent model "
                f"learns little in their space. Train one first: unfog train-autoencoder dataset=... "
                f"autoencoder={space.name}, then pass autoencoder.weights=ITS_FOLDER.")
        if lat["cache"]:  # flips through an encoder they do not commute with: the mirror images are cached too
            mirrored = bool(cfg["data"]["hflip"]) and not getattr(space.autoencoder, "flip_equivariant", False)
            data: Any = latent_cache(space, pixels, cfg["dataset"], cache_root(lat["cache_dir"]),
                                     batch_size=lat["encode_batch_size"], device=device, mirrored=mirrored, log=log)
            statistics = data.statistics
        else:
            data = EncodedOnTheFly(pixels, space.latent_shape)
            statistics = lambda: on_the_fly_statistics(space, pixels, batch_size=lat["encode_batch_size"],  # noqa: E731
                                                       device=device)
        shift, scale, how = normalization(space, lat["normalize"], statistics)
        space.shift.copy_(shift)
        space.scale.copy_(scale)
        if isinstance(data, LatentDataset):
            data.normalize(shift, scale)
        self.normalized = how
        return space, data

    # ------------------------------------------------------------------------------ model

    def model(self) -> None:
        """The schedule, the sampler of the grids, the model and the Lightning module around it."""
        from unfog.training import DiffusionModule

        cfg, dataset = self.cfg, self.dataset
        self.schedule = build("schedule", cfg["schedule"])
        self.sampler = build("sampler", cfg["sampler"])
        try:
            self.net = build_model(cfg, tuple(dataset.data_shape), dataset.num_classes)
        except ConfigError as exc:
            if self.latent is None:
                raise
            raise ConfigError(
                f"the model cannot take the latents of autoencoder {self.latent.name} (shape "
                f"{'×'.join(map(str, self.latent.latent_shape))} for data of shape "
                f"{'×'.join(map(str, self.latent.data_shape))}): {exc} Choose another autoencoder factor or "
                "backbone, or backbone=auto."
            ) from exc
        if cfg["sampling"]["guidance"] == "auto":
            cfg["sampling"]["guidance"] = auto_guidance(self.net)
            self.choices["sampling.guidance"] = str(cfg["sampling"]["guidance"])
        self.settings = SamplingSettings.of(cfg["sampling"])
        if cfg["trainer"].get("channels_last") and len(dataset.data_shape) == 3:
            self.net.use_channels_last()
        pixels = self.pixels
        self.meta = {
            "config": cfg,
            "versions": versions(e.distribution for e in self.entries.values()),
            "wiring": {
                "data_shape": list(pixels.data_shape),
                "num_classes": dataset.num_classes,
                "data_range": list(pixels.data_range) if pixels.data_range else None,
                "sample_rate": pixels.sample_rate if isinstance(pixels, Sound) else None,  # WAV files
            },
        }
        if self.latent is not None:  # what the model was built for, and what decodes its samples
            self.meta["wiring"]["latent_shape"] = list(self.latent.latent_shape)
            self.meta["autoencoder"] = self.latent.describe()
        opt, ema, loss = cfg["optim"], cfg["ema"], cfg["loss"]
        self.module = DiffusionModule(
            self.net, self.schedule, cfg["prediction"], lr=opt["lr"], weight_decay=opt["weight_decay"],
            betas=tuple(opt["betas"]), warmup_steps=opt["warmup_steps"], ema_decay=ema["decay"],
            ema_warmup=ema["warmup"], loss_weighting=loss["weighting"], min_snr_gamma=loss["min_snr_gamma"],
            offset_noise=loss["offset_noise"], sigma_data=cfg.get("sigma_data"), seed=cfg["seed"], meta=self.meta,
            latent=self.latent, hflip=cfg["data"]["hflip"],
        )
        if self.resumed:
            self._check_resumable()
        self.meta["run_id"] = (self.resumed.get("meta") or {}).get("run_id") or secrets.token_hex(4)
        self._announce()

    def _check_resumable(self) -> None:
        """Refuse a checkpoint whose parameters this config does not build, listing the settings
        that differ, instead of Lightning's "parameter group doesn't match" deep in fit."""
        then = (self.resumed["meta"].get("autoencoder") or {}).get("sha256")
        now = self.latent.sha256 if self.latent is not None else None
        if then != now:
            raise ConfigError(
                f"ckpt_path={self.cfg['ckpt_path']} was trained "
                + (f"with autoencoder weights sha256 {then[:12]}…" if then else "in pixel space (autoencoder=identity)")
                + ", but this config " + (f"gives autoencoder weights sha256 {now[:12]}…" if now else "is pixel space")
                + ". Resume with the checkpoint's autoencoder (its .hydra/config.yaml names it)."
            )
        saved = self.resumed["shapes"]
        built = {k: tuple(v.shape) for k, v in self.module.state_dict().items()}
        if saved == built:
            return
        reshaped = sorted(k for k in set(saved) & set(built) if saved[k] != built[k])
        now, then = _flat(self.cfg), _flat(self.resumed["meta"].get("config", {}))
        differ = [f"{k}={now.get(k)!r} (checkpoint: {v!r})" for k, v in then.items()
                  if k.split(".")[0] in COMPONENT_KEYS and now.get(k) != v]
        differ += [f"{k}={v!r} (not in the checkpoint's config)" for k, v in now.items()
                   if k.split(".")[0] in COMPONENT_KEYS and k not in then]
        raise ConfigError(
            f"ckpt_path={self.cfg['ckpt_path']}: this config builds a model with other parameters than the "
            f"checkpoint's (only in the checkpoint: {sorted(set(saved) - set(built))[:4]}; only here: "
            f"{sorted(set(built) - set(saved))[:4]}; other shapes: {reshaped[:4]}). "
            f"Settings that differ: {'; '.join(differ[:8]) or 'none found'}. Resume with the checkpoint's "
            "settings (the run's .hydra/config.yaml), e.g. by adding them as overrides."
        )

    def _announce(self) -> None:
        """The run's first line: the data and what was chosen for it."""
        if not _is_main_process():
            return
        d = self.pixels
        shape = "×".join(map(str, d.data_shape))
        if self.latent is not None:
            shape += f" → latents {'×'.join(map(str, self.latent.latent_shape))} by {self.latent.name}, " \
                     f"normalised {self.normalized}"
        labels = f", {d.num_classes} classes" if d.num_classes else ""
        name = self.cfg["dataset"][NAME_KEY]
        params = sum(p.numel() for p in self.net.parameters())
        chose = "; ".join(f"{k}=auto: {v}" for k, v in self.choices.items())
        print(f"unfog: data {name} ({len(d)} items of {shape}{labels}); model {params / 1e6:.2f} M parameters"
              + (f"; {chose}" if chose else ""), flush=True)

    # ---------------------------------------------------------------------------- loggers

    def loggers(self) -> None:
        """The experiment logger (wandb by default, offline without a key), continuing the
        logger run of the checkpoint when resuming."""
        from unfog.loggers import build_logger

        resolved = self.cfg
        self.logger = build_logger(plain(resolved.get("logger")), self.run_dir,
                                   config={**resolved, "versions": self.meta["versions"]},
                                   run_id=self.meta["run_id"], resume=bool(resolved["ckpt_path"]), sweep=self.sweep,
                                   verbose=bool(resolved.get("verbose")), resume_step=self.resumed.get("step", 0))

    # -------------------------------------------------------------------------- callbacks

    def callbacks(self) -> None:
        """Checkpoints, the sample grid, metrics while training, the learning-rate log, the clean
        stop on a signal and the one progress bar."""
        from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

        from unfog.callbacks import GracefulStop, MetricCallback, SampleGrid, StepProgressBar
        from unfog.evaluation import build_metrics, with_extractor
        from unfog.pipeline import DiffusionPipeline
        from unfog.sampling import dataset_examples

        cfg, dataset = self.cfg, self.dataset
        smp, ev = cfg["sampling"], cfg["evaluation"]
        fields = self.net.fields
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.grid = SampleGrid(self.sampler, self.run_dir / "samples", self.settings, smp["every_n_steps"],
                               smp["num_samples"], examples=dataset_examples(dataset, smp["num_samples"], fields))
        self.grid.check(DiffusionPipeline.from_module(self.module))
        self.stop = GracefulStop(self.ckpt_dir / "last.ckpt")
        self.callback_list: list[Any] = [
            ModelCheckpoint(dirpath=self.ckpt_dir, save_last=True, save_top_k=0,
                            every_n_train_steps=cfg["checkpoint"]["every_n_steps"]),
            self.grid,
            self.stop,
        ]
        metrics = build_metrics(with_extractor(cfg.get("metrics"), ev.get("extractor"), ev.get("extractor_weights")))
        if metrics:
            self.callback_list.append(MetricCallback(
                metrics, self.grid, self.run_dir / "evaluation.jsonl", ev["every_n_steps"], ev["num_samples"],
                ev["seed"], examples=dataset_examples(dataset, ev["num_samples"], fields),
                reference=(self.pixels, cfg["dataset"]), batch_size=ev["batch_size"]))
        if self.logger:
            self.callback_list.append(LearningRateMonitor(logging_interval="step"))
        if cfg["trainer"].get("enable_progress_bar", True) is not False:
            refresh = max(1, int(cfg["trainer"].get("log_every_n_steps") or 1))
            self.callback_list.append(StepProgressBar(refresh_rate=refresh))

    # -------------------------------------------------------------------------------- fit

    def fit(self) -> TrainResult:
        """Train to ``trainer.max_steps``; write ``last.ckpt`` at the end (or, on Ctrl-C or
        SIGTERM, at the step where training stopped, then raise :class:`Interrupted`)."""
        import lightning as L

        from unfog.callbacks import AtomicCheckpointIO
        from unfog.training import train_loader

        cfg = self.cfg
        trainer_kwargs = dict(cfg["trainer"])
        if trainer_kwargs.get("strategy") == "fsdp2":
            trainer_kwargs["strategy"] = fsdp2_strategy(trainer_kwargs)
        trainer_kwargs.pop("channels_last", None)  # applied to the model above, before its EMA copy
        compile_with = trainer_kwargs.pop("compile", False)
        if compile_with:  # in place: the state dict keeps its keys, so checkpoints stay portable
            self.net.backbone.compile(**({"backend": compile_with} if isinstance(compile_with, str) else {}))
        loader = train_loader(self.dataset, cfg["data"]["batch_size"], cfg["data"]["num_workers"], cfg["seed"],
                              self.module)
        trainer = L.Trainer(**trainer_kwargs, logger=self.logger, callbacks=self.callback_list,
                            plugins=[AtomicCheckpointIO()], default_root_dir=str(self.run_dir),
                            use_distributed_sampler=False)  # ResumableSampler shards the data itself
        start = time.perf_counter()
        trainer.fit(self.module, loader, ckpt_path=cfg["ckpt_path"], weights_only=True)  # checkpoints are untrusted
        seconds = time.perf_counter() - start
        last = self.ckpt_dir / "last.ckpt"
        if self.stop.signal_number is not None:
            self._finish_logger()
            import signal

            name = signal.Signals(self.stop.signal_number).name
            raise Interrupted(f"stopped by {name} at step {self.stop.step}; the checkpoint {last} holds that step. "
                              f"Resume with the same command and ckpt_path={last}.", self.stop.signal_number)
        trainer.save_checkpoint(last, weights_only=False)
        loss = trainer.callback_metrics.get("train/loss")
        self._finish_logger()
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        return TrainResult(self.run_dir, last, self.grid.last_path, trainer.global_step, seconds,
                           float(loss) if loss is not None else None, trainer.global_rank, metrics)

    def _finish_logger(self) -> None:
        if self.logger and type(self.logger).__name__ == "WandbLogger":
            self.logger.experiment.finish()


def fsdp2_strategy(trainer_kwargs: Mapping[str, Any]) -> Any:
    """Fully sharded data parallel (FSDP2, ``fully_shard``) over all processes, through
    Lightning's ModelParallelStrategy; the module shards itself in ``configure_model``.
    Checkpoints are gathered into one file, so they load like any other."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    devices, nodes = trainer_kwargs.get("devices"), trainer_kwargs.get("num_nodes") or 1
    if devices in ("auto", -1, "-1") and trainer_kwargs.get("accelerator") in ("gpu", "cuda", "auto"):
        devices = torch.cuda.device_count() or None
    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(
            f"trainer.strategy=fsdp2 needs trainer.devices as a number of processes per node; got "
            f"{trainer_kwargs.get('devices')!r} (on the CPU: trainer.accelerator=cpu trainer.devices=2)."
        )
    return ModelParallelStrategy(data_parallel_size=devices * nodes, tensor_parallel_size=1,
                                 save_distributed_checkpoint=False)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def _is_main_process() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def _quiet(verbose: bool) -> None:
    """Lightning's banners ("GPU available: ...", tips) only with ``verbose=true``."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def train(cfg: Mapping[str, Any], run_dir: Path, sweep: Mapping[str, str] | None = None) -> TrainResult:
    """Train the composed config ``cfg`` into ``run_dir`` (:class:`TrainRecipe`)."""
    return TrainRecipe(cfg, run_dir, sweep).run()


def _command(cfg: Any, out_dir: Path) -> float | None:
    from unfog.commands.base import call
    from unfog.commands.hydra_app import distributed_job, prepare_worker_launch, sweep_names

    prepare_worker_launch("train")
    with distributed_job():
        result = call(train, cfg, out_dir, sweep_names())
    if result.nothing_to_do and cfg.objective not in result.metrics:
        return None  # an old checkpoint with no logged metrics: nothing to report to a sweeper
    value = call(result.objective, cfg.objective)
    if result.rank != 0 or result.nothing_to_do:  # DDP workers: the launching process reports
        return value
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    print(
        f"unfog: trained {result.steps} steps in {result.seconds:.0f} s (final loss {loss}). "
        f"checkpoint: {result.checkpoint} | samples: {result.samples or 'none'} | logs: {result.run_dir}"
    )
    return value


COMMAND = Command(
    name="train", summary="train a model (default: class-conditional digits on the CPU)",
    run=_command, config="train",  # no schema here: TrainRecipe.check checks it, for Python callers too
    usage="unfog train dataset=image_folder dataset.root=DIR",
)
