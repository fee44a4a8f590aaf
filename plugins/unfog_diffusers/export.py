"""``format=diffusers``: a trained model as a folder ``diffusers.DiffusionPipeline.from_pretrained`` loads.

The folder holds ``unet/`` (the wrapped diffusers model, ``save_pretrained`` in safetensors),
``scheduler/`` (unfog's betas exactly, as ``trained_betas``, its prediction target and
clipping, and the diffusers scheduler the chosen sampler names as its counterpart:
:class:`unfog.protocols.DiffusersCounterpart`), ``model_index.json``, ``unfog.json`` (config,
wiring, versions, source, the scheduler and the pipeline call) and a ``README.md``. It needs an
unconditional ``diffusers_unet`` (or ``diffusers_folder`` holding a ``UNet2DModel``) on a
discrete schedule. DDIM (leading spacing, or trailing with T divisible by the steps) and DDPM
reproduce unfog's samples for the same noise; the other samplers map to diffusers'
implementation of the same method, close but not step for step.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unfog import available, get, register
from unfog.config import build, params_of
from unfog.errors import ConfigError
from unfog.pipeline import DiffusionPipeline
from unfog.protocols import DiffusersCounterpart, DiffusersScheduler, DiscreteBetas
from unfog.util import version_of
from unfog_diffusers.models import import_diffusers

log = logging.getLogger("unfog")

PREDICTION_TYPES: dict[str, str] = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
"""unfog's prediction target → diffusers' ``prediction_type``."""

STRIDED: tuple[str, ...] = ("DDIMScheduler", "DDPMScheduler")
"""Schedulers with unfog's arithmetic, exact wherever their timesteps are unfog's grid points."""


@register("exporter", "diffusers")
@dataclass
class DiffusersExporter:
    """A diffusers pipeline folder (DDIMPipeline/DDPMPipeline: unet/, scheduler/, model_index.json)
    for an unconditional diffusers_unet model on a discrete schedule.

    Args:
        clip: clip x̂₀ to the data range, as ``unfog sample`` does (diffusers' ``clip_sample``;
            a symmetric range only).
    """

    clip: bool = True

    def export(self, pipeline: Any, out_dir: Path, sampler: Any = None) -> Path:
        """Write the pipeline folder for ``sampler`` (None: the one the model was trained with)."""
        diffusers = import_diffusers("format=diffusers")
        unet, betas, T = _checked_model(pipeline)
        sampler = sampler if sampler is not None else _trained_sampler(pipeline)
        counterpart = _counterpart(sampler, T)
        clip_range = _clip_range(self.clip, pipeline.data_range)
        scheduler = _scheduler(diffusers, counterpart, betas, T, _prediction_type(pipeline.prediction), clip_range)
        pipeline_cls = diffusers.DDIMPipeline if counterpart.scheduler == "DDIMScheduler" else diffusers.DDPMPipeline
        call = _pipeline_call(pipeline_cls, counterpart, clip_range)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        pipeline_cls(unet=unet, scheduler=scheduler).save_pretrained(str(out), safe_serialization=True)
        name = sampler_name(sampler)
        record = _record(pipeline, sampler, counterpart, call, diffusers.__version__)
        (out / "unfog.json").write_text(json.dumps(record, indent=2))
        (out / "README.md").write_text(_readme(pipeline_cls.__name__, name, counterpart, call))
        _warn_inexact(counterpart, name, pipeline_cls.__name__, out)
        return out


def _checked_model(pipeline: Any) -> tuple[Any, Any, int]:
    """The model's diffusers U-Net, the schedule's betas and T, or a ConfigError saying why not."""
    if not isinstance(pipeline, DiffusionPipeline):
        raise ConfigError(f"format=diffusers writes one diffusion model; {type(pipeline).__name__} has no single "
                          "model to export. Export each of its stages instead.")
    cfg, schedule = pipeline.config, pipeline.schedule
    unet = _exportable_unet(pipeline.model, cfg)
    _prediction_type(pipeline.prediction)
    if not isinstance(schedule, DiscreteBetas) or schedule.betas is None or schedule.num_timesteps is None:
        name = (cfg.get("schedule") or {}).get("_name_", type(schedule).__name__)
        raise ConfigError(
            f"format=diffusers needs a discrete schedule (diffusers' schedulers are defined by betas); this model "
            f"was trained with schedule {name!r}. Use format=safetensors."
        )
    T = int(schedule.num_timesteps)
    backbone = pipeline.model.backbone
    if int(backbone.num_train_timesteps) != T:
        raise ConfigError(
            f"the backbone maps t to timesteps of a {backbone.num_train_timesteps}-step schedule, but the "
            f"schedule has T = {T}, so diffusers' timesteps would not match; train with "
            f"backbone.num_train_timesteps={T}, or use format=safetensors."
        )
    return unet, schedule.betas, T


def _exportable_unet(model: Any, cfg: Mapping[str, Any]) -> Any:
    """The model's diffusers ``UNet2DModel``, or a ConfigError saying why it cannot be exported."""
    backbone = model.backbone
    name = (cfg.get("backbone") or {}).get("_name_", type(backbone).__name__)
    inner = getattr(backbone, "diffusers_model", None)
    if inner is None:
        raise ConfigError(
            f"format=diffusers exports models trained with backbone=diffusers_unet; this one uses {name!r}, which "
            "diffusers cannot load. Use format=safetensors (loadable by unfog: unfog sample checkpoint=FOLDER)."
        )
    class_embedding = getattr(inner, "class_embedding", None)
    if type(inner).__name__ != "UNet2DModel" or len(model.conditioners) or class_embedding is not None:
        raise ConfigError(
            f"format=diffusers writes unconditional UNet2DModel pipelines (DDIMPipeline/DDPMPipeline); this model "
            f"is a {type(inner).__name__} (class_embed_type={inner.config.get('class_embed_type')}) with "
            f"conditioners {list(model.conditioners) or 'none'}, which those pipelines cannot condition. "
            "Use format=safetensors."
        )
    if inner.config.sample_size is None:  # the pipelines read the image size from the config
        shape = tuple(backbone.data_shape)
        inner.register_to_config(sample_size=shape[1] if shape[1] == shape[2] else list(shape[1:]))
    return inner


def _prediction_type(prediction: str) -> str:
    """diffusers' ``prediction_type`` for unfog's target, or a ConfigError for one it lacks."""
    if prediction not in PREDICTION_TYPES:
        raise ConfigError(
            f"diffusers' schedulers take epsilon, v_prediction or sample outputs; this model predicts "
            f"{prediction!r} (unfog's {', '.join(PREDICTION_TYPES)} map to those). Use format=safetensors."
        )
    return PREDICTION_TYPES[prediction]


def _trained_sampler(pipeline: DiffusionPipeline) -> Any:
    """The sampler of the model's training config (sampling during training)."""
    node = pipeline.config.get("sampler")
    if not node:
        raise ConfigError("format=diffusers translates a sampler into a diffusers scheduler, but none was given "
                          "and the model's config names none; add sampler=ddim (or another sampler).")
    return build("sampler", node)


def counterpart_samplers() -> list[str]:
    """The registered samplers that name a diffusers counterpart (``diffusers_scheduler``)."""
    return [name for name in available("sampler") if isinstance(get("sampler", name).obj, DiffusersCounterpart)]


def sampler_name(sampler: Any) -> str:
    """The registry name of ``sampler``'s class (its class name if it is not registered)."""
    names = [name for name in available("sampler") if get("sampler", name).obj is type(sampler)]
    return names[0] if names else type(sampler).__name__


def _counterpart(sampler: Any, T: int) -> DiffusersScheduler:
    """The sampler's diffusers scheduler for a T-step schedule, or a ConfigError naming those that have one."""
    if not isinstance(sampler, DiffusersCounterpart):
        raise ConfigError(
            f"sampler {sampler_name(sampler)!r} has no diffusers scheduler; format=diffusers maps "
            f"{', '.join(counterpart_samplers())}."
        )
    return sampler.diffusers_scheduler(T)


def _clip_range(clip: bool, data_range: Any) -> float | None:
    """diffusers' symmetric ``clip_sample_range`` for unfog's clipping of x̂₀ to the data range."""
    if not clip or not data_range:
        return None
    lo, hi = (float(v) for v in data_range)
    if lo != -hi:
        raise ConfigError(
            f"diffusers clips x̂₀ to [-r, r], but this model's data range is [{lo}, {hi}]; export with clip=false."
        )
    return hi


def _scheduler(diffusers: Any, counterpart: DiffusersScheduler, betas: Any, T: int, prediction: str,
               clip_range: float | None) -> Any:
    """The counterpart's diffusers scheduler on unfog's exact betas, prediction target and clipping."""
    cls = getattr(diffusers, counterpart.scheduler, None)
    if cls is None:
        raise ConfigError(f"the sampler's diffusers counterpart {counterpart.scheduler} is not in the installed "
                          f"diffusers {diffusers.__version__}; upgrade diffusers.")
    accepted = set(inspect.signature(cls.__init__).parameters)
    unknown = sorted(set(counterpart.config) - accepted)
    if unknown:
        raise ConfigError(f"the sampler asks {counterpart.scheduler} for {', '.join(unknown)}, which diffusers "
                          f"{diffusers.__version__} does not take; upgrade diffusers.")
    ours = {"num_train_timesteps": T, "trained_betas": [float(b) for b in betas.tolist()],
            "prediction_type": prediction, "clip_sample": clip_range is not None,
            "clip_sample_range": clip_range if clip_range is not None else 1.0}
    return cls(**(dict(counterpart.config) | {k: v for k, v in ours.items() if k in accepted}))


def _pipeline_call(pipeline_cls: Any, counterpart: DiffusersScheduler, clip_range: float | None) -> dict[str, Any]:
    """The pipeline arguments that reproduce the unfog sampler."""
    call = dict(counterpart.call)
    if "use_clipped_model_output" in inspect.signature(pipeline_cls.__call__).parameters:
        # unfog recomputes ε̂ from the clipped x̂₀ (Ho et al. 2020, Sec. 3.3), which diffusers does on request
        call["use_clipped_model_output"] = clip_range is not None
    return call


def _sampler_node(sampler: Any) -> dict[str, Any]:
    """The sampler as a config node (``_name_`` and its settings), for the record."""
    params = [p.name for p in params_of(type(sampler)) if hasattr(sampler, p.name)]
    return {"_name_": sampler_name(sampler), **{k: getattr(sampler, k) for k in params}}


def _record(pipeline: DiffusionPipeline, sampler: Any, counterpart: DiffusersScheduler, call: Mapping[str, Any],
            diffusers_version: str) -> dict[str, Any]:
    """What ``unfog.json`` says: the model's config and provenance, the sampler and its translation."""
    return {
        "format": "diffusers",
        "config": pipeline.config,
        "wiring": pipeline.wiring,
        "versions": pipeline.versions,
        "exported_by": {"unfog": version_of("unfog"), "diffusers": diffusers_version},
        "source_checkpoint": str(Path(pipeline.source).resolve()) if pipeline.source else None,
        "ema": pipeline.weights == "ema",
        "sampler": _sampler_node(sampler),
        "scheduler": counterpart.scheduler,
        "exact": counterpart.exact,
        "pipeline_call": dict(call),
    }


def _warn_inexact(counterpart: DiffusersScheduler, sampler: str, pipeline: str, out: Path) -> None:
    """Log what the exported pipeline does not reproduce."""
    if not counterpart.exact and counterpart.scheduler in STRIDED:
        log.warning("diffusers' %s steps from timestep τ to τ - T//steps, which matches unfog's %s only for "
                    "leading spacing, or trailing with T divisible by the steps; the export is close, not exact.",
                    counterpart.scheduler, sampler)
    if counterpart.scaled_input:
        log.warning("%s needs scale_model_input, which %s does not call; drive pipe.unet and pipe.scheduler "
                    "yourself (see %s).", counterpart.scheduler, pipeline, out / "README.md")


def _readme(pipeline: str, sampler: str, counterpart: DiffusersScheduler, call: Mapping[str, Any]) -> str:
    """The folder's README: how to load and call the pipeline, and how close it is to unfog's sampler."""
    scheduler = counterpart.scheduler
    args = ", ".join(f"{k}={v!r}" for k, v in call.items() if v is not None)
    lines = [
        "# Exported from unfog", "",
        f"A `{pipeline}` with a `{scheduler}` (unfog sampler `{sampler}`) on the model's own betas.", "",
        "```python", "import diffusers",
        'pipe = diffusers.DiffusionPipeline.from_pretrained("THIS_FOLDER")',
        f"images = pipe(batch_size=4, {args}).images", "```", "",
        "Timesteps follow diffusers' convention: unfog's grid point t = i/T is diffusers' timestep i - 1.",
        "unfog starts from sigma(1) times standard noise; diffusers' pipelines from standard noise.",
    ]
    if counterpart.exact:
        lines.append(f"With these arguments `{scheduler}` takes the same steps as unfog's `{sampler}`.")
    elif scheduler in STRIDED:
        lines.append(f"With this spacing and step count `{scheduler}` takes steps close to, not equal to, unfog's.")
    else:
        lines.append(f"`{scheduler}` is diffusers' implementation of the method, not step for step unfog's.")
    if counterpart.scaled_input:
        lines += ["", f"`{pipeline}` does not call `scheduler.scale_model_input` or scale the initial noise by",
                  "`scheduler.init_noise_sigma`, which this scheduler needs: run the loop yourself."]
    return "\n".join(lines) + "\n"
