"""What ``unfog train`` and ``unfog sample`` do once a config is composed."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import unfog
from unfog import registry
from unfog.config import build, component_kwargs, plain
from unfog.diffusion import check_prediction, check_weighting, sigma_data_of
from unfog.errors import ConfigError
from unfog.model import DiffusionModel

log = logging.getLogger("unfog")

COMPONENT_KINDS = ("dataset", "backbone", "schedule", "sampler")


def conditioner_nodes(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config nodes of a model's conditioners by key (``conditioners.KEY``); a checkpoint
    written before several conditioners were possible has one under ``conditioner``."""
    nodes = dict(cfg.get("conditioners") or {})
    old = cfg.get("conditioner")
    if old is not None and not nodes:
        nodes[dict(plain(old))["_name_"]] = old
    return {k: v for k, v in nodes.items() if v is not None}


def route_of(entry: registry.Entry, node: Mapping[str, Any]) -> str:
    """A conditioner's route: its ``route`` setting if it has one, else its class's."""
    return str(dict(plain(node)).get("route") or getattr(entry.obj, "route", "?"))


def validate(cfg: Mapping[str, Any]) -> dict[str, registry.Entry]:
    """Check a composed train config without building anything; return the chosen entries.

    Refuses unknown components, bad parameter values and prediction targets, and
    combinations that cannot work, with a message that says why.
    """
    check_prediction(cfg["prediction"])
    loss = cfg.get("loss") or {}
    check_weighting(loss.get("weighting", "uniform"))
    if not float(loss.get("min_snr_gamma", 5.0)) > 0:
        raise ConfigError(f"loss.min_snr_gamma must be positive; got {loss['min_snr_gamma']} (Hang et al. use 5).")
    if float(loss.get("offset_noise", 0.0)) < 0:
        raise ConfigError(f"loss.offset_noise must be at least 0; got {loss['offset_noise']} (0.1 is usual).")
    chosen = {kind: component_kwargs(kind, cfg[kind])[0] for kind in COMPONENT_KINDS if cfg.get(kind) is not None}
    backbone = chosen["backbone"].obj
    routes = list(getattr(backbone, "routes", ()))
    for key, node in conditioner_nodes(cfg).items():
        entry = chosen[f"conditioners.{key}"] = component_kwargs("conditioner", node)[0]
        route = route_of(entry, node)
        if route not in routes:
            raise ConfigError(
                f"conditioner {key!r} ({entry.name}) routes to {route!r}, but backbone "
                f"{chosen['backbone'].name!r} consumes only {routes}"
                + ("; give it route=vector if it has that setting." if "route" in dict(plain(node)) else ".")
            )
    schedule = build("schedule", cfg["schedule"])
    check_schedule_and_prediction(schedule, cfg["prediction"])
    sigma_data_of(schedule, cfg.get("sigma_data"))
    guidance = plain(cfg["sampling"]["guidance"])
    if guidance != 1.0 and not conditioner_nodes(cfg):
        raise ConfigError(
            f"sampling.guidance={guidance} needs a conditioner; set sampling.guidance=1 or add conditioner=NAME."
        )
    return chosen


def check_schedule_and_prediction(schedule: Any, prediction: str) -> None:
    """Refuse ``eps`` prediction on a schedule that reaches α = 0: x̂₀ = (x − σ·ε̂)/α has no
    value there (Lin et al. 2024, Sec. 3.2)."""
    alpha_end = float(schedule.alpha(torch.tensor([1.0], dtype=torch.float64))[0])
    if prediction == "eps" and alpha_end < 1e-5:  # zero terminal SNR (to float precision)
        raise ConfigError(
            f"prediction=eps cannot work with this schedule: α(1) = {alpha_end:.2g}, so x₀ cannot be "
            "recovered from a noise prediction at t = 1. Use prediction=v, x0, flow or edm."
        )


def check_data(cfg: Mapping[str, Any], dataset: Any, chosen: Mapping[str, registry.Entry]) -> None:
    """Refuse a backbone or conditioner that does not fit the data, before building the model."""
    b = chosen["backbone"]
    rank = len(dataset.data_shape)
    offset = float((cfg.get("loss") or {}).get("offset_noise", 0.0))
    if offset > 0 and rank < 2:
        raise ConfigError(
            f"loss.offset_noise={offset} shifts each channel of an image, but dataset "
            f"{chosen['dataset'].name!r} gives samples of shape {tuple(dataset.data_shape)} with no positions; "
            "set loss.offset_noise=0."
        )
    if rank not in b.obj.data_ranks:
        raise ConfigError(
            f"backbone {b.name!r} takes samples of rank {list(b.obj.data_ranks)}, but dataset "
            f"{chosen['dataset'].name!r} gives shape {tuple(dataset.data_shape)} (rank {rank}); "
            f"choose another backbone (`unfog list backbone`)."
        )
    import inspect

    for key, node in conditioner_nodes(cfg).items():
        c = chosen[f"conditioners.{key}"]
        default = inspect.signature(c.obj).parameters.get("field")
        field = dict(plain(node)).get("field", default.default if default else None)
        if field not in dataset.fields:
            raise ConfigError(
                f"conditioner {key!r} ({c.name}) reads the batch field {field!r}, but dataset "
                f"{chosen['dataset'].name!r} provides only {list(dataset.fields)}; set "
                f"conditioners.{key}.field to one of those, drop it with `~conditioner`, or pick a "
                f"dataset that has {field!r}."
            )


def build_model(cfg: Mapping[str, Any], data_shape: tuple[int, ...], num_classes: int | None) -> DiffusionModel:
    """The backbone and its conditioners, wired to the data and to each other."""
    conditioners = {
        key: build("conditioner", node, num_classes=num_classes, data_shape=tuple(data_shape))
        for key, node in conditioner_nodes(cfg).items()
    }
    by_route: dict[str, dict[str, int]] = {}
    for key, c in conditioners.items():
        by_route.setdefault(c.route, {})[key] = int(c.dim)
    widths = set(by_route.get("tokens", {}).values())
    if len(widths) > 1:
        raise ConfigError(
            f"token conditioners are joined along the sequence, so they need one width; got "
            f"{by_route['tokens']}. Give them the same dim (or route one of them to vector)."
        )
    backbone = build(
        "backbone", cfg["backbone"], data_shape=tuple(data_shape),
        cond_dim=sum(by_route.get("vector", {}).values()),
        context_dim=widths.pop() if widths else 0,
        cond_channels=sum(by_route.get("concat", {}).values()),
    )
    return DiffusionModel(backbone, conditioners)


def versions(entries: Mapping[str, registry.Entry]) -> dict[str, str]:
    """Versions of unfog, torch, lightning and every distribution providing a chosen component."""
    names = {"unfog", "torch", "lightning"} | {e.distribution for e in entries.values() if e.distribution}
    out = {}
    for name in sorted(names):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


@dataclass
class TrainResult:
    """Where a finished training run left its outputs."""

    run_dir: Path
    checkpoint: Path
    samples: Path | None
    steps: int
    seconds: float
    final_loss: float | None
    rank: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def objective(self, name: str) -> float:
        """The final value of the logged metric ``name`` (what a sweeper optimizes)."""
        if name not in self.metrics:
            raise ConfigError(
                f"objective={name} was not logged by this run; logged metrics: {sorted(self.metrics) or 'none'}."
            )
        return self.metrics[name]


def train(cfg: Mapping[str, Any], run_dir: Path, sweep: Mapping[str, str] | None = None) -> TrainResult:
    """Train the composed config, writing checkpoints, samples and logs into ``run_dir``.

    ``sweep`` names the sweep (``group``) and this job (``name``) for the logger. Resuming
    from ``ckpt_path`` continues the logger run recorded in that checkpoint.
    """
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from unfog.callbacks import AtomicCheckpointIO, MetricCallback, SampleGrid, StepProgressBar
    from unfog.evaluation import build_metrics, with_extractor
    from unfog.loggers import build_logger
    from unfog.sampling import dataset_examples
    from unfog.training import DiffusionModule

    chosen = validate(cfg)
    if cfg["ckpt_path"] and not Path(cfg["ckpt_path"]).is_file():
        raise ConfigError(f"ckpt_path={cfg['ckpt_path']} does not exist; give a checkpoint file to resume from.")
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    dataset = build("dataset", cfg["dataset"])
    check_data(cfg, dataset, chosen)
    schedule = build("schedule", cfg["schedule"])
    sampler = build("sampler", cfg["sampler"])
    model = build_model(cfg, tuple(dataset.data_shape), dataset.num_classes)
    if cfg["trainer"].get("channels_last") and len(dataset.data_shape) == 3:
        model.use_channels_last()
    resolved = plain(cfg)
    meta = {
        "config": resolved,
        "versions": versions(chosen),
        "wiring": {
            "data_shape": list(dataset.data_shape),
            "num_classes": dataset.num_classes,
            "data_range": list(dataset.data_range) if dataset.data_range else None,
            "sample_rate": getattr(dataset, "sample_rate", None),  # sound: written as WAV files
        },
    }
    opt, ema, smp, loss = cfg["optim"], cfg["ema"], cfg["sampling"], cfg["loss"]
    module = DiffusionModule(
        model, schedule, cfg["prediction"], lr=opt["lr"], weight_decay=opt["weight_decay"],
        betas=tuple(opt["betas"]), warmup_steps=opt["warmup_steps"], ema_decay=ema["decay"],
        ema_warmup=ema["warmup"], loss_weighting=loss["weighting"], min_snr_gamma=loss["min_snr_gamma"],
        offset_noise=loss["offset_noise"], sigma_data=cfg.get("sigma_data"), seed=cfg["seed"], meta=meta,
    )
    loader = train_loader(dataset, cfg["data"]["batch_size"], cfg["data"]["num_workers"], cfg["seed"], module)
    previous = _resumed_from(cfg["ckpt_path"], module, resolved)
    run_id = previous.get("run_id") or _new_run_id()
    meta["run_id"] = run_id
    logger = build_logger(plain(cfg.get("logger")), run_dir, config={**resolved, "versions": meta["versions"]},
                          run_id=run_id, resume=bool(cfg["ckpt_path"]), sweep=sweep)
    ckpt_dir = run_dir / "checkpoints"
    model.guidance_plan(plain(smp["guidance"]))  # refuse bad scales before training, not at the first grid
    grid = SampleGrid(sampler, run_dir / "samples", tuple(dataset.data_shape), dataset.data_range,
                      smp["every_n_steps"], smp["num_samples"], smp["seed"], plain(smp["guidance"]), smp["clip"],
                      smp["batch_size"], smp["guidance_rescale"], plain(smp["guidance_interval"]),
                      examples=dataset_examples(dataset, smp["num_samples"], model.fields),
                      sample_rate=getattr(dataset, "sample_rate", None))
    grid.check(model)
    callbacks: list[Any] = [
        ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                        every_n_train_steps=cfg["checkpoint"]["every_n_steps"]),
        grid,
    ]
    ev = cfg["evaluation"]  # a bad metric config fails here, before training
    metrics = build_metrics(with_extractor(cfg.get("metrics"), ev.get("extractor"), ev.get("extractor_weights")))
    if metrics:
        callbacks.append(MetricCallback(metrics, grid, run_dir / "evaluation.jsonl", ev["every_n_steps"],
                                        ev["num_samples"], ev["seed"],
                                        examples=dataset_examples(dataset, ev["num_samples"], model.fields),
                                        reference=(dataset, plain(cfg["dataset"])), batch_size=ev["batch_size"]))
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg["trainer"].get("enable_progress_bar", True) is not False:
        callbacks.append(StepProgressBar(refresh_rate=max(1, int(cfg["trainer"].get("log_every_n_steps") or 1))))
    trainer_kwargs = dict(plain(cfg["trainer"]))
    if trainer_kwargs.get("strategy") == "fsdp2":
        trainer_kwargs["strategy"] = fsdp2_strategy(trainer_kwargs)
    trainer_kwargs.pop("channels_last", None)  # applied to the model above, before its EMA copy
    compile_with = trainer_kwargs.pop("compile", False)
    if compile_with:  # in place: the state dict keeps its keys, so checkpoints stay portable
        model.backbone.compile(**({"backend": compile_with} if isinstance(compile_with, str) else {}))
    trainer = L.Trainer(**trainer_kwargs, logger=logger, callbacks=callbacks,
                        plugins=[AtomicCheckpointIO()], default_root_dir=str(run_dir),
                        use_distributed_sampler=False)  # ResumableSampler shards the data itself
    start = time.perf_counter()
    trainer.fit(module, loader, ckpt_path=cfg["ckpt_path"], weights_only=True)  # checkpoints are untrusted
    seconds = time.perf_counter() - start
    last = ckpt_dir / "last.ckpt"
    trainer.save_checkpoint(last, weights_only=False)
    loss = trainer.callback_metrics.get("train/loss")
    if logger and hasattr(logger, "experiment") and _is_wandb(logger):
        logger.experiment.finish()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    return TrainResult(run_dir, last, grid.last_path, trainer.global_step, seconds,
                       float(loss) if loss is not None else None, trainer.global_rank, metrics)


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


def train_loader(dataset: Any, batch_size: int, num_workers: int, seed: int, module: Any) -> Any:
    """A DataLoader whose order depends only on the seed and the batches ``module`` has
    trained on (restored with its checkpoint), sharded across processes."""
    from torch.utils.data import DataLoader

    from unfog.data import ResumableSampler

    def position() -> tuple[int, int, int]:
        trainer = module._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return module.batches_trained, rank, world

    sampler = ResumableSampler(len(dataset), batch_size, seed, position)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


def _new_run_id() -> str:
    import secrets

    return secrets.token_hex(4)


def _resumed_from(ckpt_path: str | None, module: Any, config: Mapping[str, Any]) -> dict[str, Any]:
    """The unfog metadata of the checkpoint a run resumes from ({} for a fresh run), after
    checking that it holds the parameters this config builds. When it does not (a setting
    or a component's default changed since it was written), the error lists the settings
    that differ instead of Lightning's "parameter group doesn't match"."""
    if not ckpt_path:
        return {}
    # mmap: only metadata and key names are read here; Lightning loads the weights itself
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    meta = ckpt.get("unfog") or {}
    saved = {k: tuple(v.shape) for k, v in ckpt.get("state_dict", {}).items()}
    built = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if saved != built:
        reshaped = sorted(k for k in set(saved) & set(built) if saved[k] != built[k])
        now, then = _flat(config), _flat(meta.get("config", {}))
        differ = [f"{k}={now.get(k)!r} (checkpoint: {v!r})" for k, v in then.items()
                  if k.split(".")[0] in COMPONENT_KEYS and now.get(k) != v]
        differ += [f"{k}={v!r} (not in the checkpoint's config)" for k, v in now.items()
                   if k.split(".")[0] in COMPONENT_KEYS and k not in then]
        raise ConfigError(
            f"ckpt_path={ckpt_path}: this config builds a model with other parameters than the checkpoint's "
            f"(only in the checkpoint: {sorted(set(saved) - set(built))[:4]}; only here: "
            f"{sorted(set(built) - set(saved))[:4]}; other shapes: {reshaped[:4]}). "
            f"Settings that differ: {'; '.join(differ[:8]) or 'none found'}. Resume with the checkpoint's "
            "settings (the run's .hydra/config.yaml), e.g. by adding them as overrides."
        )
    return meta


COMPONENT_KEYS = ("backbone", "conditioners", "schedule", "dataset", "prediction")


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def _is_wandb(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger"


def load_checkpoint(path: str | Path, use_ema: bool = True) -> tuple[DiffusionModel, Any, dict[str, Any]]:
    """Rebuild the model (EMA weights by default) and schedule stored in a training checkpoint.

    The file is untrusted input: it is read with ``weights_only=True``. A folder is read as a
    ``unfog export format=safetensors`` export (:func:`unfog.export.load_exported`).
    """
    if Path(path).is_dir():
        from unfog.export import load_exported

        return load_exported(path)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint={path} does not exist; pass a run's checkpoints/last.ckpt.")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt.get("unfog")
    if not meta:
        raise ConfigError(f"{path} is not an unfog training checkpoint (it has no 'unfog' section).")
    cfg, wiring = meta["config"], meta["wiring"]
    model = build_model(cfg, tuple(wiring["data_shape"]), wiring["num_classes"])
    prefix = "ema.module." if use_ema else "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    schedule = build("schedule", cfg["schedule"])
    return model.eval(), schedule, meta


@dataclass
class SampleResult:
    """What ``unfog sample`` wrote."""

    samples: torch.Tensor
    labels: torch.Tensor | None
    grid: Path | None
    npz: Path
    metrics: dict[str, dict[str, float]] | None  # {metric: {value name: value}}


def sample(cfg: Mapping[str, Any], out_dir: Path) -> SampleResult:
    """Draw ``num_samples`` from a checkpoint with any sampler; write a PNG grid and ``.npz``."""
    import numpy as np

    from unfog.audio import is_audio, write_wavs
    from unfog.evaluation import build_metrics, score
    from unfog.images import picture, save_png
    from unfog.sampling import generate

    model, schedule, meta = load_checkpoint(cfg["checkpoint"], cfg["use_ema"])
    sampler = build("sampler", cfg["sampler"])
    metrics = build_metrics(cfg.get("metrics"))
    wiring = meta["wiring"]
    n = int(cfg["num_samples"])
    device = device_of(cfg["device"])
    model.to(device)
    values = sample_values(model, n, cfg)
    guidance = plain(cfg["guidance"])
    model.guidance_plan(guidance)  # a wrong conditioner name fails before any sampling
    clip = tuple(wiring["data_range"]) if cfg["clip"] and wiring["data_range"] else None
    samples = generate(model, schedule, sampler, meta["config"]["prediction"], wiring["data_shape"], range(n),
                       seed=cfg["seed"], values=values, guidance=guidance, clip=clip,
                       batch_size=cfg["batch_size"], device=device, sigma_data=meta["config"].get("sigma_data"),
                       progress=True, guidance_rescale=cfg.get("guidance_rescale", 0.0),
                       guidance_interval=plain(cfg.get("guidance_interval")))
    labels, captions = labels_of(model, values), captions_of(model, values)
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = out_dir / "samples.npz"
    arrays = {"samples": samples.numpy()} | ({"labels": labels.numpy()} if labels is not None else {})
    arrays |= {"captions": np.array(captions)} if captions is not None else {}
    np.savez(npz, **arrays)
    pic = picture(samples, wiring["num_classes"] if labels is not None else None,
                  tuple(wiring["data_range"]) if wiring["data_range"] else None)
    grid = save_png(pic, out_dir / "samples.png") if pic is not None else None
    if wiring.get("sample_rate") and is_audio(wiring["data_shape"]):
        write_wavs(samples, int(wiring["sample_rate"]), out_dir / "wav")
    if captions is not None:
        (out_dir / "prompts.txt").write_text("".join(f"{k}\t{c}\n" for k, c in enumerate(captions)))
    results = None
    if metrics:
        results = score(metrics, samples, labels, captions)
        record = {"results": results, "metrics": plain(cfg["metrics"]), "sampler": plain(cfg["sampler"]),
                  "guidance": guidance, "guidance_rescale": cfg.get("guidance_rescale", 0.0),
                  "guidance_interval": plain(cfg.get("guidance_interval")), "num_samples": n,
                  "seed": cfg["seed"], "checkpoint": str(cfg["checkpoint"]), "unfog": unfog.__version__}
        (out_dir / "metrics.json").write_text(json.dumps(record, indent=2))
    return SampleResult(samples, labels, grid, npz, results)


def is_text(conditioner: Any) -> bool:
    """Whether a conditioner reads text (its null value is a list of strings)."""
    null = conditioner.null_value(1)
    return isinstance(null, (list, tuple)) and all(isinstance(v, str) for v in null)


def sample_values(model: DiffusionModel, n: int, cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """Per-sample conditioning values for ``unfog sample``: ``labels`` for the class
    conditioner, ``prompt``/``prompts`` for text conditioners, fields of a ``values`` .npz,
    each cycled over the ``n`` samples; the rest as :func:`default_values` picks them."""
    import numpy as np

    from unfog.errors import DataError
    from unfog.sampling import default_values

    given = {"labels": cfg.get("labels"), "prompt": cfg.get("prompt"), "prompts": cfg.get("prompts"),
             "values": cfg.get("values")}
    if not len(model.conditioners):
        used = [k for k, v in given.items() if v]
        if used:
            raise ConfigError(f"{', '.join(used)}=... was given, but this model has no conditioner.")
        return None
    values: dict[str, Any] = {}

    def cycle(items: Any) -> Any:
        idx = [k % len(items) for k in range(n)]
        return [items[i] for i in idx] if isinstance(items, list) else torch.as_tensor(items)[idx]

    if given["values"]:
        path = Path(given["values"])
        if not path.is_file():
            raise ConfigError(f"values={path} does not exist; give an .npz whose arrays are batch fields.")
        with np.load(path) as data:
            values |= {k: cycle([str(v) for v in data[k]] if data[k].dtype.kind in "US" else data[k])
                       for k in data.files}
    if given["labels"]:
        fields = [c.field for c in model.conditioners.values() if getattr(c, "num_classes", None)]
        if not fields:
            raise ConfigError(f"labels=... was given, but no conditioner of this model reads labels "
                              f"(its conditioners: {list(model.conditioners)}).")
        values[fields[0]] = cycle(torch.tensor(list(given["labels"])))
    if given["prompt"] or given["prompts"]:
        if given["prompt"] and given["prompts"]:
            raise ConfigError("give prompt=TEXT or prompts=FILE, not both.")
        fields = [c.field for c in model.conditioners.values() if is_text(c)]
        if not fields:
            raise ConfigError(f"prompt/prompts was given, but no conditioner of this model reads text "
                              f"(its conditioners: {list(model.conditioners)}).")
        if given["prompts"]:
            path = Path(given["prompts"])
            if not path.is_file():
                raise ConfigError(f"prompts={path} does not exist; give a text file with one prompt per line.")
            prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if not prompts:
                raise DataError(f"prompts={path} holds no prompts; write one prompt per line.")
        else:
            prompts = [str(given["prompt"])]
        values |= {f: cycle(prompts) for f in fields}
    missing = {c.field for c in model.conditioners.values()} - set(values)
    if missing:
        picked = default_values(model, n)  # raises, naming the conditioner, when nothing fits
        values |= {f: picked[f] for f in missing}
    return values


def labels_of(model: DiffusionModel, values: Mapping[str, Any] | None) -> torch.Tensor | None:
    for c in model.conditioners.values():
        if getattr(c, "num_classes", None) and values and c.field in values:
            return torch.as_tensor(values[c.field])
    return None


def captions_of(model: DiffusionModel, values: Mapping[str, Any] | None) -> list[str] | None:
    for c in model.conditioners.values():
        if is_text(c) and values and c.field in values:
            return list(values[c.field])
    return None


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
