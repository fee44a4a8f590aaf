"""Typed schemas of the configs that are not components: sampling settings, the root configs of
the kernel's commands and the Lightning trainer.

Unknown keys and wrong types fail when Hydra composes a config. Ranges are declared beside each
field (``field(metadata=at_least(1))``) and checked by :func:`check_config` right after
composition, before anything is built: a value out of range is one line naming the key, the
value and what is allowed. :class:`SamplingSettings` is the one node for how samples are drawn,
shared by ``unfog train`` (its ``sampling`` grid), ``unfog sample`` and ``unfog evaluate``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from omegaconf import MISSING, DictConfig, OmegaConf

from unfog.errors import ConfigError

# Trainer arguments that unfog builds itself from other config groups.
_TRAINER_BUILT = frozenset({"logger", "callbacks", "plugins", "default_root_dir", "use_distributed_sampler"})


# ------------------------------------------------------------------------------ constraints


def at_least(low: float, hint: str = "") -> dict[str, Any]:
    """Field metadata: the value must be ≥ ``low`` (None passes; say so with ``| None``)."""
    return {"rule": lambda v: v >= low, "says": f"at least {low}", "hint": hint}


def above(low: float, hint: str = "") -> dict[str, Any]:
    """Field metadata: the value must be > ``low``."""
    return {"rule": lambda v: v > low, "says": f"greater than {low}", "hint": hint}


def within(low: float, high: float, hint: str = "") -> dict[str, Any]:
    """Field metadata: ``low`` ≤ value ≤ ``high``."""
    return {"rule": lambda v: low <= v <= high, "says": f"in [{low}, {high}]", "hint": hint}


def checked_by(check: Callable[[Any, str], None]) -> dict[str, Any]:
    """Field metadata: ``check(value, key)`` raises a ConfigError for a bad value."""
    return {"check": check}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_guidance(value: Any, key: str, allow_auto: bool = False) -> None:
    """A guidance scale g ≥ 0 (1: none, 0: unconditional), or ``{conditioner: g}``."""
    if allow_auto and value == "auto":
        return
    items = dict(value).items() if isinstance(value, Mapping) else [(None, value)]
    for name, g in items:
        where = f"{key}.{name}" if name is not None else key
        if not _number(g) or not math.isfinite(g) or g < 0:
            shape = "a number ≥ 0 (1 = no guidance)" + (", auto" if allow_auto else "")
            raise ConfigError(
                f"{where}={g!r} is not a guidance scale: give {shape}, or one per conditioner as "
                f"{key}={{NAME: SCALE}}, e.g. {key}=2."
            )


def _check_interval(value: Any, key: str) -> None:
    if value is None:
        return
    v = list(value)
    if len(v) != 2 or not all(_number(x) and math.isfinite(x) for x in v) or not 0.0 <= v[0] < v[1]:
        raise ConfigError(
            f"{key}={v!r} is not a noise-level interval: give [σ_lo, σ_hi] with 0 ≤ σ_lo < σ_hi "
            f"(levels σ/α), e.g. {key}=[0.3,5] (Kynkäänniemi et al. 2024), or null to guide everywhere."
        )


def _check_labels(value: Any, key: str) -> None:
    if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ConfigError(f"{key}={list(value)!r}: labels are class numbers ≥ 0, e.g. {key}=[0,1,2].")


# --------------------------------------------------------------------------- the schemas


@dataclass
class SamplingSettings:
    """How samples are drawn from a trained model, whatever draws them: classifier-free guidance
    (one scale or one per conditioner), its rescale and noise-level interval, clipping of x̂₀ to
    the data range, the seed of the per-sample noise streams, and the batch size."""

    guidance: Any = field(default=1.0, metadata=checked_by(check_guidance))
    guidance_rescale: float = field(default=0.0, metadata=within(0.0, 1.0, "φ of Lin et al. (2024); 0.7 is theirs"))
    guidance_interval: list[float] | None = field(default=None, metadata=checked_by(_check_interval))
    clip: bool = True
    seed: int = field(default=0, metadata=at_least(0))
    batch_size: int = field(default=256, metadata=at_least(1))

    @classmethod
    def of(cls, node: Mapping[str, Any]) -> SamplingSettings:
        """The settings held by a config node that has these fields (and maybe others)."""
        data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        settings = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        check_node(dataclasses.asdict(settings), cls)
        return settings


@dataclass
class SampleGridConfig(SamplingSettings):
    """The fixed-seed sample grid drawn with the EMA weights while training. ``guidance: auto``
    is 2 when the model has a conditioner trained with dropout, else 1."""

    guidance: Any = field(default="auto", metadata=checked_by(lambda v, k: check_guidance(v, k, allow_auto=True)))
    every_n_steps: int = field(default=1000, metadata=at_least(0, "0 draws only at the end"))
    num_samples: int = field(default=64, metadata=at_least(0, "0 draws no grid"))


@dataclass
class DataConfig:
    """How batches are drawn from the dataset."""

    batch_size: int = field(default=128, metadata=at_least(1))
    num_workers: int = field(default=0, metadata=at_least(0))
    hflip: bool = False  # mirror half of every batch left-right (images; not with captions that say "left")


@dataclass
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) with a linear warm-up of the learning rate."""

    lr: float = field(default=2e-4, metadata=above(0.0, "1e-4 to 1e-3 is usual"))
    weight_decay: float = field(default=0.0, metadata=at_least(0.0))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999],
                               metadata=checked_by(lambda v, k: _check_betas(v, k)))
    warmup_steps: int = field(default=0, metadata=at_least(0))


def _check_betas(value: Any, key: str) -> None:
    v = list(value)
    if len(v) != 2 or not all(_number(b) and 0.0 <= b < 1.0 for b in v):
        raise ConfigError(f"{key}={v!r}: AdamW's betas are two numbers in [0, 1), e.g. {key}=[0.9,0.999].")


@dataclass
class EMAConfig:
    """Exponential moving average of the weights, used for sampling."""

    decay: float = field(default=0.999, metadata=within(0.0, 1.0))
    warmup: bool = True  # decay_n = min(decay, (1 + n) / (10 + n)) early in training


@dataclass
class LossConfig:
    """How the regression loss is weighted over noise levels, and the training noise."""

    weighting: str = "uniform"  # uniform | min_snr (Hang et al. 2023) | edm (Karras et al. 2022)
    min_snr_gamma: float = field(default=5.0, metadata=above(0.0, "Hang et al. use 5"))  # γ of min-SNR-γ
    offset_noise: float = field(default=0.0, metadata=at_least(0.0, "0.1 is usual"))  # Guttenberg (2023)


@dataclass
class EvaluationConfig:
    """Metrics (``metric=[...]``) computed while training on samples drawn with the EMA weights,
    the sampler and the guidance of ``sampling``, shared out across processes."""

    every_n_steps: int = field(default=1000, metadata=at_least(0, "0 scores only at the end"))
    num_samples: int = field(default=256, metadata=at_least(0))
    seed: int = field(default=0, metadata=at_least(0))
    batch_size: int = field(default=256, metadata=at_least(1))
    extractor: str | None = None  # sets metrics.*.extractor of every metric that has one
    extractor_weights: str | None = None  # sets metrics.*.weights likewise


@dataclass
class LatentsConfig:
    """How a latent model (``autoencoder`` other than ``identity``) reads its data."""

    cache: bool = True  # encode the dataset once and reuse it (false: encode every batch)
    cache_dir: str | None = None  # null: $UNFOG_CACHE_DIR/latents or ~/.cache/unfog/latents
    normalize: str = field(default="auto", metadata=checked_by(lambda v, k: _check_choice(
        v, k, ("auto", "channels", "fixed", "none"))))
    encode_batch_size: int = field(default=64, metadata=at_least(1))
    device: str = "auto"  # where the cache is encoded: auto | cpu | cuda[:N]


def _check_choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}; choose one of {', '.join(choices)}.")


@dataclass
class CheckpointConfig:
    """How often ``last.ckpt`` is refreshed (it is always written at the end too)."""

    every_n_steps: int = field(default=500, metadata=at_least(1))


@dataclass
class TrainConfig:
    """Root of ``unfog train``: the components and the training settings."""

    dataset: Any = MISSING
    backbone: Any = MISSING
    schedule: Any = MISSING
    sampler: Any = MISSING
    autoencoder: Any = None  # the first stage: identity (pixel space) unless a latent model
    conditioners: dict[str, Any] = field(default_factory=dict)  # key -> conditioner node
    metrics: dict[str, Any] = field(default_factory=dict)  # name -> metric node, scored while training
    trainer: Any = MISSING
    logger: Any = None
    prediction: str = "eps"
    sigma_data: float | None = field(default=None, metadata=above(0.0, "0.5 for data in [-1, 1]"))
    seed: int = field(default=0, metadata=at_least(0))
    ckpt_path: str | None = None
    objective: str = "train/loss"
    verbose: bool = False  # Lightning's and wandb's banners and summaries
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sampling: SampleGridConfig = field(default_factory=SampleGridConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    latents: LatentsConfig = field(default_factory=LatentsConfig)


@dataclass
class DrawConfig(SamplingSettings):
    """What ``unfog sample`` and ``unfog evaluate`` share: the model, the sampler and what to draw."""

    checkpoint: str = MISSING
    sampler: Any = MISSING
    metrics: dict[str, Any] = field(default_factory=dict)  # name -> metric node (metric=NAME or [A,B])
    num_samples: int = field(default=64, metadata=at_least(1))
    labels: list[int] | None = field(default=None, metadata=checked_by(_check_labels))
    prompt: str | None = None  # for a text-conditioned model: one prompt for every sample
    prompts: str | None = None  # a text file, one prompt per line, cycled over the samples
    values: str | None = None  # an .npz of batch fields (e.g. x: images to upscale), cycled over the samples
    device: str = "auto"
    output_dir: str | None = None
    use_ema: bool = True


@dataclass
class SampleConfig(DrawConfig):
    """Root of ``unfog sample``: a checkpoint, any sampler, and what to draw."""


@dataclass
class EvaluateConfig(DrawConfig):
    """Root of ``unfog evaluate``: samples from a checkpoint scored by metrics, with the protocol
    (sampler, seeds, guidance, extractor and reference hashes, versions) written beside."""

    extractor: str | None = None  # sets metrics.*.extractor of every metric that has one
    extractor_weights: str | None = None  # sets metrics.*.weights likewise (e.g. a train-classifier folder)
    dataset: Any = None  # the reference data; None: the checkpoint's training dataset
    num_samples: int = field(default=10000, metadata=at_least(1))


@dataclass
class ExportConfig:
    """Root of ``unfog export``: a checkpoint written in another format (``format=NAME``, an
    exporter; ``unfog list exporter``); ``sampler`` is the sampler a format that has a
    sampler of its own (a diffusers scheduler) follows."""

    checkpoint: str = MISSING
    format: Any = MISSING
    sampler: Any = MISSING
    output_dir: str | None = None
    use_ema: bool = True


# ------------------------------------------------------------------------------- trainer


def trainer_schema() -> type:
    """A dataclass of ``lightning.Trainer``'s keyword arguments (values untyped, keys checked;
    :func:`check_trainer` checks the values against Lightning's annotations)."""
    from lightning import Trainer

    fields = []
    for p in inspect.signature(Trainer.__init__).parameters.values():
        keyword = p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        if p.name == "self" or p.name in _TRAINER_BUILT or not keyword:
            continue
        default = p.default if _is_plain(p.default) else None
        fields.append((p.name, Any, dataclasses.field(default=default)))
    # unfog's own switch: compile the backbone's forward with torch.compile (Module.compile):
    # false, true (the default inductor backend) or a backend name such as "cudagraphs".
    fields.append(("compile", Any, dataclasses.field(default=False)))
    # and keep images in channels-last memory order (NHWC), which convolutions run faster in
    # on tensor-core GPUs and with oneDNN on CPUs.
    fields.append(("channels_last", bool, dataclasses.field(default=False)))
    return dataclasses.make_dataclass("trainer", fields)


# Ranges Lightning's annotations do not say (None always passes where the annotation allows it).
TRAINER_RANGES: dict[str, dict[str, Any]] = {
    "max_steps": at_least(-1, "-1: no limit"),
    "min_steps": at_least(0),
    "max_epochs": at_least(-1, "-1: no limit"),
    "min_epochs": at_least(0),
    "num_nodes": at_least(1),
    "accumulate_grad_batches": at_least(1),
    "log_every_n_steps": at_least(1),
    "gradient_clip_val": at_least(0.0, "1.0 is usual"),
    "check_val_every_n_epoch": at_least(1),
    "num_sanity_val_steps": at_least(-1),
    "limit_train_batches": at_least(0),
    "overfit_batches": at_least(0),
    "reload_dataloaders_every_n_epochs": at_least(0),
}
_UNFOG_TRAINER = {"compile": bool | str, "channels_last": bool}


def check_trainer(node: Mapping[str, Any], key: str = "trainer") -> None:
    """Every value of the trainer node against ``lightning.Trainer``'s annotations and
    :data:`TRAINER_RANGES`, e.g. ``trainer.max_steps=abc`` or ``trainer.max_steps=-5``."""
    from lightning import Trainer

    try:
        hints = typing.get_type_hints(Trainer.__init__)
    except Exception:  # an annotation Lightning cannot resolve: check nothing rather than fail
        hints = {}
    hints |= _UNFOG_TRAINER
    for name, value in node.items():
        hint = hints.get(name)
        if hint is not None and not _fits(value, hint):
            raise ConfigError(f"{key}.{name}={value!r}: lightning.Trainer's {name} takes {_describe(hint)}.")
        _check_range(value, f"{key}.{name}", TRAINER_RANGES.get(name, {}))


def _fits(value: Any, hint: Any) -> bool:
    """Whether a config value (plain Python) can stand for an argument annotated ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return _number(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value) if args else True
    if origin in (dict, Mapping) or hint is dict:
        return isinstance(value, Mapping)
    return False  # an object type (an Accelerator, a timedelta) no config value stands for


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        literals = [v for a in args if typing.get_origin(a) is Literal for v in typing.get_args(a)]
        parts = ["one of " + ", ".join(map(repr, literals))] if literals else []
        parts += [_describe(a) for a in args
                  if a is not type(None) and _plain_hint(a) and typing.get_origin(a) is not Literal]
        parts += ["null"] if type(None) in args else []
        return " or ".join(dict.fromkeys(parts))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}s" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _plain_hint(hint: Any) -> bool:
    """Whether a config file could give a value of this type (not an Accelerator object, say)."""
    origin = typing.get_origin(hint)
    return hint in (bool, int, float, str) or origin in (Literal, list, tuple, dict, Union, types.UnionType)


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


# -------------------------------------------------------------------------------- checking


def _check_range(value: Any, key: str, meta: Mapping[str, Any]) -> None:
    if "check" in meta:
        meta["check"](value, key)
    rule = meta.get("rule")
    if rule is None or value is None:
        return
    if not _number(value) or not math.isfinite(value) or not rule(value):
        hint = f" ({meta['hint']})" if meta.get("hint") else ""
        raise ConfigError(f"{key}={value!r} is out of range: it must be {meta['says']}{hint}.")


def check_node(node: Mapping[str, Any], schema: type, prefix: str = "") -> None:
    """Check the values of ``node`` against the ranges declared on ``schema``'s fields,
    descending into nested schemas; the first bad value raises a one-line ConfigError."""
    known = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(node) - known)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" Did you mean {prefix}{close[0]}?" if close else ""
        raise ConfigError(f"{prefix}{unknown[0]} is not a setting here.{hint} The settings of "
                          f"{prefix.rstrip('.') or 'this command'} are: {', '.join(sorted(known))}.")
    for f in dataclasses.fields(schema):
        if f.name not in node:
            continue
        value, key = node[f.name], f"{prefix}{f.name}"
        nested = _schema_of(f)
        if nested is not None and isinstance(value, Mapping):
            check_node(value, nested, f"{key}.")
        else:
            _check_range(value, key, f.metadata)


def _schema_of(f: dataclasses.Field) -> type | None:
    factory = f.default_factory
    if factory is not dataclasses.MISSING and inspect.isclass(factory) and dataclasses.is_dataclass(factory):
        return factory
    return None


def check_config(cfg: Mapping[str, Any], schema: type) -> None:
    """Everything about a composed root config that can be checked without building a
    component: ranges of every node of ``schema`` and, when there is one, the trainer node."""
    node = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    check_node(node, schema)
    if isinstance(node.get("trainer"), Mapping):
        check_trainer(node["trainer"])


def register_static_schemas(cs: Any) -> None:
    """Store the root and trainer schemas in Hydra's ConfigStore."""
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(group="trainer", name="trainer_schema", node=trainer_schema())
