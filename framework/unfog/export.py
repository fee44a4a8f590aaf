"""``unfog export``: a trained model as safetensors (any backbone) or as a diffusers pipeline.

``format=safetensors`` writes ``model.safetensors`` (the model's state dict) and ``unfog.json``
(config, wiring, versions, source checkpoint, the weights' sha256): everything
:func:`load_exported` needs to rebuild the model without the training checkpoint, so
``unfog sample checkpoint=FOLDER`` works on it.

``format=diffusers`` writes a folder ``diffusers.DiffusionPipeline.from_pretrained`` loads:
``unet/`` (the wrapped diffusers model, ``save_pretrained`` in safetensors), ``scheduler/``
(unfog's betas exactly, as ``trained_betas``, its prediction target and clipping, and the
diffusers scheduler of the chosen sampler) and ``model_index.json``. It needs an
unconditional ``diffusers_unet`` (or ``diffusers_folder`` holding a ``UNet2DModel``) on a
discrete schedule. DDIM (η = 0, leading spacing, or trailing with T divisible by the steps)
and DDPM reproduce unfog's samples for the same noise; the other samplers map to diffusers'
implementation of the same method, close but not step for step.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from unfog.config import build, plain
from unfog.errors import ConfigError, DataError
from unfog.evaluation import sha256_of

log = logging.getLogger("unfog")

FORMATS: tuple[str, ...] = ("safetensors", "diffusers")
WEIGHTS, META = "model.safetensors", "unfog.json"

PREDICTION_TYPES: dict[str, str] = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
"""unfog's prediction target → diffusers' ``prediction_type``."""

SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm_solver_pp": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
}
"""unfog sampler → the diffusers scheduler implementing the same method."""

EXACT = ("ddim", "ddpm")  # step-for-step the same arithmetic as unfog's sampler
SCALED_INPUT = ("euler", "heun", "euler_ancestral")  # diffusers schedulers that need scale_model_input


def _unfog_version() -> str:
    try:
        return metadata.version("unfog")
    except metadata.PackageNotFoundError:
        return "unknown"


def export_safetensors(checkpoint: str | Path, out_dir: str | Path, use_ema: bool = True) -> Path:
    """Write ``model.safetensors`` (the model's state dict, EMA weights by default) and
    ``unfog.json`` into ``out_dir``; return ``out_dir``. Works for every backbone."""
    from safetensors.torch import save_file

    from unfog.run import load_checkpoint

    model, _, meta = load_checkpoint(checkpoint, use_ema)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # clone: tied weights share storage, which safetensors refuses; each key gets its own copy
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "producer": "unfog"})
    record = {
        "format": "unfog-safetensors",
        "config": meta["config"],
        "wiring": meta["wiring"],
        "versions": meta.get("versions", {}),
        "exported_by": {"unfog": _unfog_version()},
        "source_checkpoint": str(Path(checkpoint).resolve()),
        "weights": WEIGHTS,
        "ema": bool(use_ema),
        "sha256": sha256_of(out / WEIGHTS),
    }
    (out / META).write_text(json.dumps(record, indent=2))
    return out


def load_exported(folder: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """Rebuild the model and schedule of a ``format=safetensors`` export: (model, schedule, meta),
    as :func:`unfog.run.load_checkpoint` gives them for a training checkpoint."""
    from safetensors.torch import load_file

    from unfog.run import build_model

    folder = Path(folder)
    if not (folder / META).is_file():
        pipeline = (folder / "model_index.json").is_file()
        hint = (" It is a diffusers pipeline folder: load it with diffusers, or train from its unet/ with "
                "backbone=diffusers_folder backbone.path=FOLDER/unet.") if pipeline else ""
        raise ConfigError(
            f"{folder} is not an unfog export (it has no {META}); export one with "
            f"`unfog export checkpoint=PATH format=safetensors`.{hint}"
        )
    meta = json.loads((folder / META).read_text())
    weights = folder / meta.get("weights", WEIGHTS)
    if not weights.is_file():
        raise DataError(f"{weights} is missing; the export in {folder} is incomplete. Export it again.")
    if meta.get("sha256") and sha256_of(weights) != meta["sha256"]:
        raise DataError(
            f"{weights} does not match the sha256 recorded in {folder / META}; the file was changed or is "
            "incomplete. Export it again."
        )
    cfg, wiring = meta["config"], meta["wiring"]
    model = build_model(cfg, tuple(wiring["data_shape"]), wiring["num_classes"])
    model.load_state_dict(load_file(str(weights)))
    schedule = build("schedule", cfg["schedule"])
    return model.eval(), schedule, meta


def export_diffusers(checkpoint: str | Path, out_dir: str | Path, sampler_node: Mapping[str, Any] | None = None,
                     use_ema: bool = True, clip: bool = True) -> Path:
    """Write a diffusers pipeline folder (``unet/``, ``scheduler/``, ``model_index.json``) for a
    model trained with an unconditional ``diffusers_unet``; return ``out_dir``.

    ``sampler_node`` is an unfog sampler config (``{"_name_": "ddim", "steps": 10, ...}``;
    None: the one the model was trained with) that picks the diffusers scheduler; ``clip``
    clips x̂₀ to the data range as ``unfog sample`` does (``clip_sample``).
    """
    from unfog.run import load_checkpoint

    diffusers = _import_diffusers()
    model, schedule, meta = load_checkpoint(checkpoint, use_ema)
    cfg, wiring = meta["config"], meta["wiring"]
    unet = _exportable_unet(model, cfg)
    prediction = _prediction_type(cfg["prediction"])
    betas = getattr(schedule, "betas", None)
    if betas is None or getattr(schedule, "num_timesteps", None) is None:
        raise ConfigError(
            f"format=diffusers needs a discrete schedule (diffusers' schedulers are defined by betas); this model "
            f"was trained with schedule {cfg['schedule']['_name_']!r}. Use format=safetensors."
        )
    T = int(schedule.num_timesteps)
    if int(model.backbone.num_train_timesteps) != T:
        raise ConfigError(
            f"the backbone maps t to timesteps of a {model.backbone.num_train_timesteps}-step schedule, but the "
            f"schedule has T = {T}, so diffusers' timesteps would not match; train with "
            f"backbone.num_train_timesteps={T}, or use format=safetensors."
        )
    node = dict(plain(sampler_node if sampler_node is not None else cfg["sampler"]))
    name = node.get("_name_")
    if name not in SCHEDULERS:
        raise ConfigError(
            f"sampler {name!r} has no diffusers scheduler; format=diffusers maps {', '.join(SCHEDULERS)}."
        )
    sampler = build("sampler", node)
    clip_range = _clip_range(clip, wiring.get("data_range"))
    scheduler = _scheduler(diffusers, name, sampler, betas, T, prediction, clip_range)
    pipeline_cls = diffusers.DDIMPipeline if name == "ddim" else diffusers.DDPMPipeline
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline_cls(unet=unet, scheduler=scheduler).save_pretrained(str(out), safe_serialization=True)
    call = _pipeline_call(name, sampler, clip_range)
    exact = _exact(name, sampler, T)
    if not exact and name in EXACT:
        log.warning("diffusers' %s steps from timestep τ to τ - T//steps, which matches unfog's %s only for "
                    "leading spacing, or trailing with T divisible by the steps; the export is close, not exact.",
                    type(scheduler).__name__, name)
    record = {
        "format": "diffusers",
        "config": cfg,
        "wiring": wiring,
        "versions": meta.get("versions", {}),
        "exported_by": {"unfog": _unfog_version(), "diffusers": diffusers.__version__},
        "source_checkpoint": str(Path(checkpoint).resolve()),
        "ema": bool(use_ema),
        "sampler": node,
        "scheduler": type(scheduler).__name__,
        "exact": exact,
        "pipeline_call": call,
    }
    (out / META).write_text(json.dumps(record, indent=2))
    (out / "README.md").write_text(_readme(pipeline_cls.__name__, type(scheduler).__name__, name, call, exact))
    if name in SCALED_INPUT:
        log.warning("%s needs scale_model_input, which %s does not call; drive pipe.unet and pipe.scheduler "
                    "yourself (see %s).", type(scheduler).__name__, pipeline_cls.__name__, out / "README.md")
    return out


def export(cfg: Mapping[str, Any], out_dir: str | Path | None = None) -> Path:
    """Export as ``cfg`` says (``format``, ``checkpoint``, ``use_ema``, ``sampler``, ``clip``)
    into ``out_dir`` (default: ``cfg.output_dir``); return the folder written."""
    fmt = cfg.get("format")
    target = out_dir if out_dir is not None else cfg.get("output_dir")
    if not target:
        raise ConfigError("export needs output_dir=FOLDER.")
    if fmt == "safetensors":
        return export_safetensors(cfg["checkpoint"], target, bool(cfg.get("use_ema", True)))
    if fmt == "diffusers":
        return export_diffusers(cfg["checkpoint"], target, cfg.get("sampler"), bool(cfg.get("use_ema", True)),
                                bool(cfg.get("clip", True)))
    raise ConfigError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as exc:
        message = "format=diffusers needs diffusers, which is not installed: pip install 'unfog[diffusers]'"
        raise ConfigError(message) from exc
    return diffusers


def _exportable_unet(model: Any, cfg: Mapping[str, Any]) -> Any:
    """The model's diffusers ``UNet2DModel``, or a ConfigError saying why it cannot be exported."""
    backbone = model.backbone
    name = cfg["backbone"]["_name_"]
    inner = getattr(backbone, "diffusers_model", None)
    if inner is None:
        raise ConfigError(
            f"format=diffusers exports models trained with backbone=diffusers_unet; this one uses {name!r}, which "
            "diffusers cannot load. Use format=safetensors (loadable by unfog: unfog sample checkpoint=FOLDER)."
        )
    if type(inner).__name__ != "UNet2DModel" or len(model.conditioners) or inner.class_embedding is not None:
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
    if prediction not in PREDICTION_TYPES:
        raise ConfigError(
            f"diffusers' schedulers take epsilon, v_prediction or sample outputs; this model predicts "
            f"{prediction!r} (unfog's {', '.join(PREDICTION_TYPES)} map to those). Use format=safetensors."
        )
    return PREDICTION_TYPES[prediction]


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


def _spacing(name: str, sampler: Any) -> dict[str, Any]:
    """diffusers' timestep-spacing options for the unfog sampler's time grid."""
    spacing = getattr(sampler, "spacing", None) or "leading"
    if spacing in ("leading", "trailing", "linspace"):
        return {"timestep_spacing": spacing}
    if name in EXACT:
        raise ConfigError(
            f"diffusers' {SCHEDULERS[name]} visits grid points of the discrete schedule only; sampler.spacing="
            f"{spacing} has no counterpart. Export with sampler.spacing=leading, trailing or linspace."
        )
    if spacing == "karras":
        return {"use_karras_sigmas": True}
    if spacing == "logsnr":
        return {"use_lu_lambdas": True}
    return {"timestep_spacing": "linspace"}


def _scheduler(diffusers: Any, name: str, sampler: Any, betas: torch.Tensor, T: int, prediction: str,
               clip_range: float | None) -> Any:
    """The diffusers scheduler for unfog sampler ``name`` on unfog's exact betas."""
    import inspect

    cls = getattr(diffusers, SCHEDULERS[name])
    kwargs: dict[str, Any] = {
        "num_train_timesteps": T, "trained_betas": [float(b) for b in betas.tolist()],
        "prediction_type": prediction, "steps_offset": 0, "clip_sample": clip_range is not None,
        "clip_sample_range": clip_range if clip_range is not None else 1.0, **_spacing(name, sampler),
    }
    if name == "ddim":
        kwargs["set_alpha_to_one"] = True  # the last step lands on x̂₀, as unfog's does
    elif name == "ddpm":
        kwargs["variance_type"] = "fixed_small" if getattr(sampler, "variance", "small") == "small" else "fixed_large"
    elif name == "dpm_solver_pp":
        kwargs |= {"algorithm_type": "sde-dpmsolver++" if sampler.variant == "sde" else "dpmsolver++",
                   "solver_order": sampler.order, "lower_order_final": sampler.lower_order_final,
                   "final_sigmas_type": "zero"}
    elif name == "unipc":
        kwargs |= {"solver_order": sampler.order, "solver_type": sampler.variant,
                   "lower_order_final": sampler.lower_order_final, "final_sigmas_type": "zero"}
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


def _exact(name: str, sampler: Any, T: int) -> bool:
    """Whether diffusers' scheduler takes unfog's steps exactly: DDPM steps to the next grid point
    of its list; DDIM always steps back T//S, which is the next point only on these grids."""
    if name == "ddpm":
        return True
    if name != "ddim":
        return False
    spacing, steps = sampler.spacing or "leading", int(sampler.steps)
    return spacing == "leading" or (spacing == "trailing" and T % steps == 0)


def _pipeline_call(name: str, sampler: Any, clip_range: float | None) -> dict[str, Any]:
    """The pipeline arguments that reproduce the unfog sampler."""
    call: dict[str, Any] = {"num_inference_steps": getattr(sampler, "steps", None)}
    if name == "ddim":
        # unfog recomputes ε̂ from the clipped x̂₀ (Ho et al. 2020, Sec. 3.3), which diffusers does on request
        call |= {"eta": float(sampler.eta), "use_clipped_model_output": clip_range is not None}
    return call


def _readme(pipeline: str, scheduler: str, sampler: str, call: Mapping[str, Any], exact: bool) -> str:
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
    if exact:
        lines.append(f"With these arguments `{scheduler}` takes the same steps as unfog's `{sampler}`.")
    elif sampler in EXACT:
        lines.append(f"With this spacing and step count `{scheduler}` takes steps close to, not equal to, unfog's.")
    else:
        lines.append(f"`{scheduler}` is diffusers' implementation of the method, not step for step unfog's.")
    if sampler in SCALED_INPUT:
        lines += ["", f"`{pipeline}` does not call `scheduler.scale_model_input` or scale the initial noise by",
                  "`scheduler.init_noise_sigma`, which this scheduler needs: run the loop yourself."]
    return "\n".join(lines) + "\n"
