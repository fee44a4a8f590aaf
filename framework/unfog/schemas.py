"""Typed schemas of the configs that are not components: the root train, sample, evaluate and export
configs and the Lightning trainer. Unknown keys and wrong types fail at compose time."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

# Trainer arguments that unfog builds itself from other config groups.
_TRAINER_BUILT = frozenset({"logger", "callbacks", "plugins", "default_root_dir", "use_distributed_sampler"})


@dataclass
class DataConfig:
    """How batches are drawn from the dataset."""

    batch_size: int = 128
    num_workers: int = 0


@dataclass
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) with a linear warm-up of the learning rate."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0


@dataclass
class EMAConfig:
    """Exponential moving average of the weights, used for sampling."""

    decay: float = 0.999
    warmup: bool = True  # decay_n = min(decay, (1 + n) / (10 + n)) early in training


@dataclass
class SamplingConfig:
    """The fixed-seed sample grid drawn with the EMA weights while training."""

    every_n_steps: int = 1000
    num_samples: int = 64
    seed: int = 0
    guidance: Any = 1.0  # one scale for every conditioner, or {conditioner: scale}
    guidance_rescale: float = 0.0
    guidance_interval: list[float] | None = None
    clip: bool = True
    batch_size: int = 256


@dataclass
class LossConfig:
    """How the regression loss is weighted over noise levels, and the training noise."""

    weighting: str = "uniform"  # uniform | min_snr (Hang et al. 2023) | edm (Karras et al. 2022)
    min_snr_gamma: float = 5.0  # γ of min-SNR-γ
    offset_noise: float = 0.0  # per-channel offset added to the noise (Guttenberg 2023); 0.1 is usual


@dataclass
class EvaluationConfig:
    """Metrics (``metric=[...]``) computed while training on samples drawn with the EMA weights,
    the sampler and the guidance of ``sampling``, shared out across processes."""

    every_n_steps: int = 1000  # and at the end of training; 0: only at the end
    num_samples: int = 256
    seed: int = 0
    batch_size: int = 256
    extractor: str | None = None  # sets metrics.*.extractor of every metric that has one
    extractor_weights: str | None = None  # sets metrics.*.weights likewise


@dataclass
class CheckpointConfig:
    """How often ``last.ckpt`` is refreshed (it is always written at the end too)."""

    every_n_steps: int = 500


@dataclass
class TrainConfig:
    """Root of ``unfog train``: the components and the training settings."""

    dataset: Any = MISSING
    backbone: Any = MISSING
    schedule: Any = MISSING
    sampler: Any = MISSING
    conditioners: dict[str, Any] = field(default_factory=dict)  # key -> conditioner node
    metrics: dict[str, Any] = field(default_factory=dict)  # name -> metric node, scored while training
    trainer: Any = MISSING
    logger: Any = None
    prediction: str = "eps"
    sigma_data: float | None = None
    seed: int = 0
    ckpt_path: str | None = None
    objective: str = "train/loss"
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class SampleConfig:
    """Root of ``unfog sample``: a checkpoint, any sampler, and what to draw."""

    checkpoint: str = MISSING
    sampler: Any = MISSING
    metrics: dict[str, Any] = field(default_factory=dict)  # name -> metric node (metric=NAME or [A,B])
    num_samples: int = 64
    batch_size: int = 256
    guidance: Any = 1.0  # one scale for every conditioner, or {conditioner: scale}
    guidance_rescale: float = 0.0  # φ of Lin et al. (2024), Sec. 3.4; 0.7 is theirs
    guidance_interval: list[float] | None = None  # [σ_lo, σ_hi]: guide only there (Kynkäänniemi et al. 2024)
    seed: int = 0
    labels: list[int] | None = None
    prompt: str | None = None  # for a text-conditioned model: one prompt for every sample
    prompts: str | None = None  # a text file, one prompt per line, cycled over the samples
    values: str | None = None  # an .npz of batch fields (e.g. x: images to upscale), cycled over the samples
    clip: bool = True
    device: str = "auto"
    output_dir: str | None = None
    use_ema: bool = True


@dataclass
class EvaluateConfig:
    """Root of ``unfog evaluate``: samples from a checkpoint scored by metrics, with the protocol
    (sampler, seeds, guidance, extractor and reference hashes, versions) written beside."""

    checkpoint: str = MISSING
    sampler: Any = MISSING
    metrics: dict[str, Any] = field(default_factory=dict)  # name -> metric node
    extractor: str | None = None  # sets metrics.*.extractor of every metric that has one
    extractor_weights: str | None = None  # sets metrics.*.weights likewise (e.g. a train-classifier folder)
    dataset: Any = None  # the reference data; None: the checkpoint's training dataset
    num_samples: int = 10000
    batch_size: int = 256
    guidance: Any = 1.0
    guidance_rescale: float = 0.0
    guidance_interval: list[float] | None = None
    seed: int = 0
    labels: list[int] | None = None
    prompt: str | None = None
    prompts: str | None = None
    values: str | None = None
    clip: bool = True
    device: str = "auto"
    output_dir: str | None = None
    use_ema: bool = True


@dataclass
class ExportConfig:
    """Root of ``unfog export``: a checkpoint written as safetensors (any backbone) or as a
    diffusers pipeline whose scheduler follows ``sampler``."""

    checkpoint: str = MISSING
    format: str = "safetensors"  # safetensors | diffusers
    sampler: Any = MISSING  # format=diffusers: picks the diffusers scheduler (ddim, ddpm, ...)
    output_dir: str | None = None
    use_ema: bool = True
    clip: bool = True  # format=diffusers: clip x̂₀ to the data range (clip_sample), as unfog sample does


def trainer_schema() -> type:
    """A dataclass of ``lightning.Trainer``'s keyword arguments (values untyped, keys checked)."""
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


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def register_static_schemas(cs: Any) -> None:
    """Store the root and trainer schemas in Hydra's ConfigStore."""
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(group="trainer", name="trainer_schema", node=trainer_schema())
