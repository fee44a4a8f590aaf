"""``format=diffusers``: a trained model as a folder ``diffusers.DiffusionPipeline.from_pretrained`` loads.

The folder holds the network (``unet/`` or ``transformer/``, ``save_pretrained`` in
safetensors), ``scheduler/`` (unfog's betas exactly, as ``trained_betas``, its prediction
target and clipping, and the diffusers scheduler the chosen sampler names as its counterpart:
:class:`unfog.protocols.DiffusersCounterpart`), ``model_index.json``, ``unfog.json`` (config,
wiring, versions, source, the scheduler, the pipeline call and a latent model's autoencoder)
and a ``README.md``. It needs a diffusers network on a discrete schedule:

* a pixel model: an unconditional ``diffusers_unet`` (or ``diffusers_folder`` holding a
  ``UNet2DModel``) → ``DDIMPipeline``/``DDPMPipeline``;
* a latent model (``pipeline.latent``): an unconditional ``diffusers_unet`` → ``LDMPipeline``
  (``vqvae/``, ``unet/``), or a ``diffusers_transformer`` (DiT) with no conditioner or one
  ``class_label`` → ``DiTPipeline`` (``vae/``, ``transformer/``). The autoencoder (``kl``,
  converted by :func:`unfog_diffusers.vae.kl_to_diffusers`, or ``diffusers_vae``'s
  ``AutoencoderKL``) is written as an ``AutoencoderKL``; unfog's per-channel normalisation
  z_n = (z − shift)·scale, which diffusers' single ``scaling_factor`` cannot express, is
  folded into its 1×1 ``post_quant_conv`` (:func:`fold_normalization`).

DDIM (leading spacing, or trailing with T divisible by the steps) and DDPM reproduce unfog's
samples for the same noise; the other samplers map to diffusers' implementation of the same
method, close but not step for step.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unfog import available, get, register
from unfog.config import build, params_of
from unfog.errors import ConfigError
from unfog.pipeline import DiffusionPipeline
from unfog.protocols import DiffusersCounterpart, DiffusersScheduler, DiscreteBetas
from unfog.util import sha256_of, version_of
from unfog_diffusers.models import import_diffusers

log = logging.getLogger("unfog")

PREDICTION_TYPES: dict[str, str] = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
"""unfog's prediction target → diffusers' ``prediction_type``."""

STRIDED: tuple[str, ...] = ("DDIMScheduler", "DDPMScheduler")
"""Schedulers with unfog's arithmetic, exact wherever their timesteps are unfog's grid points."""


@register("exporter", "diffusers")
@dataclass
class DiffusersExporter:
    """A diffusers pipeline folder for a diffusers network on a discrete schedule: DDIMPipeline/
    DDPMPipeline (unet/, scheduler/) for an unconditional pixel-space diffusers_unet; for a latent
    model LDMPipeline (vqvae/, unet/, scheduler/) for an unconditional diffusers_unet, DiTPipeline
    (vae/, transformer/, scheduler/) for a diffusers_transformer with at most a class_label.

    Args:
        clip: clip x̂₀ to the data range, as ``unfog sample`` does (diffusers' ``clip_sample``;
            a symmetric range only). Latents are never clipped: unfog and diffusers' latent
            pipelines clamp the decoded images instead.
    """

    clip: bool = True

    def export(self, pipeline: Any, out_dir: Path, sampler: Any = None) -> Path:
        """Write the pipeline folder for ``sampler`` (None: the one the model was trained with)."""
        diffusers = import_diffusers("format=diffusers")
        net, betas, T = _checked_model(pipeline)
        sampler = sampler if sampler is not None else _trained_sampler(pipeline)
        counterpart = _counterpart(sampler, T)
        if pipeline.latent is None:
            clip_range = _clip_range(self.clip, pipeline.data_range)
            ddim = counterpart.scheduler == "DDIMScheduler"
            pipeline_cls = diffusers.DDIMPipeline if ddim else diffusers.DDPMPipeline
            components, stage = {"unet": net}, None
        else:  # latents are unbounded: the pipelines clamp the decoded pixels, as unfog does
            clip_range = None
            pipeline_cls, components, stage = _latent_target(diffusers, pipeline, net, counterpart)
        scheduler = _scheduler(diffusers, counterpart, betas, T, _prediction_type(pipeline.prediction), clip_range)
        call = _pipeline_call(pipeline_cls, counterpart, clip_range, pipeline)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        pipeline_cls(**components, scheduler=scheduler).save_pretrained(str(out), safe_serialization=True)
        name = sampler_name(sampler)
        record = _record(pipeline, sampler, counterpart, call, diffusers.__version__)
        if stage is not None:
            record["autoencoder"] = stage.record(pipeline.latent, out)
            if pipeline_cls.__name__ == "DiTPipeline":
                _write_id2label(out, pipeline)
        (out / "unfog.json").write_text(json.dumps(record, indent=2))
        (out / "README.md").write_text(_readme(pipeline_cls.__name__, name, counterpart, call, stage, pipeline))
        _warn_inexact(counterpart, name, pipeline_cls.__name__, out)
        return out


def _checked_model(pipeline: Any) -> tuple[Any, Any, int]:
    """The model's diffusers network, the schedule's betas and T, or a ConfigError saying why not."""
    if not isinstance(pipeline, DiffusionPipeline):
        raise ConfigError(f"format=diffusers writes one diffusion model; {type(pipeline).__name__} has no single "
                          "model to export. Export each of its stages instead.")
    cfg, schedule = pipeline.config, pipeline.schedule
    if pipeline.latent is None:
        net = _exportable_unet(pipeline.model, cfg)
    else:
        net = _latent_network(pipeline)
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
    return net, schedule.betas, T


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
            f"Use format=safetensors. (A latent model exports as {LATENT_MODELS}.)"
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


# ------------------------------------------------------------------------------------------ latent models

LATENT_MODELS = ("LDMPipeline for an unconditional diffusers_unet, DiTPipeline for a diffusers_transformer with no "
                 "conditioner or one class_label conditioner; both with autoencoder=kl or diffusers_vae")
"""What ``format=diffusers`` exports of a latent model, for the errors."""

DIT_LABELS = 1000
"""diffusers' DiT label table: DiTPipeline passes class 1000 for the unconditional half of guidance."""


def _latent_network(pipeline: DiffusionPipeline) -> Any:
    """A latent model's diffusers ``UNet2DModel`` or ``DiTTransformer2DModel``, or a ConfigError
    naming what exports."""
    model, cfg = pipeline.model, pipeline.config
    backbone = model.backbone
    name = (cfg.get("backbone") or {}).get("_name_", type(backbone).__name__)
    inner = getattr(backbone, "diffusers_model", None)
    kind = type(inner).__name__ if inner is not None else None
    names = {key: _conditioner_name(cfg, key, c) for key, c in model.conditioners.items()}
    others = [f"{key} ({n})" for key, n in names.items() if n != "class_label"]
    if others:
        raise ConfigError(
            f"no diffusers pipeline takes unfog's conditioner {', '.join(others)}: format=diffusers writes a latent "
            f"model as {LATENT_MODELS}. Use format=safetensors (loadable by unfog: unfog sample checkpoint=FOLDER)."
        )
    if kind not in ("UNet2DModel", "DiTTransformer2DModel"):
        what = f"a {kind}" if kind else "not a diffusers model"
        raise ConfigError(
            f"format=diffusers writes a latent model as {LATENT_MODELS}; this one uses backbone {name!r} ({what}), "
            "which no diffusers latent pipeline runs. Use format=safetensors (loadable by unfog: unfog sample "
            "checkpoint=FOLDER)."
        )
    if kind == "UNet2DModel":
        if names or getattr(inner, "class_embedding", None) is not None:
            raise ConfigError(
                f"LDMPipeline is unconditional, but this latent {name} has conditioners {list(names) or 'none'} "
                f"(class_embed_type={inner.config.get('class_embed_type')}); a class-conditional latent model "
                "exports with backbone=diffusers_transformer (DiTPipeline). Use format=safetensors."
            )
        shape = tuple(backbone.data_shape)
        if shape[1] != shape[2]:
            raise ConfigError(
                f"LDMPipeline draws square latents (unet.config.sample_size is one side), but this model's latents "
                f"are {shape[1]}×{shape[2]}; use format=safetensors."
            )
        if inner.config.sample_size is None:
            inner.register_to_config(sample_size=shape[1])
        return inner
    if len(names) > 1:
        raise ConfigError(f"DiTPipeline takes one class label, but this model has the conditioners {list(names)}; "
                          "use format=safetensors.")
    for key in names:
        classes = int(model.conditioners[key].num_classes)
        if classes > DIT_LABELS:
            raise ConfigError(f"DiTPipeline's label table holds {DIT_LABELS} classes (its null class is "
                              f"{DIT_LABELS}); conditioner {key!r} has {classes}. Use format=safetensors.")
    return inner


def _conditioner_name(cfg: Mapping[str, Any], key: str, conditioner: Any) -> str:
    """The registry name a conditioner was built from (its class name if the config lacks it)."""
    node = (cfg.get("conditioners") or {}).get(key) or {}
    return str(node.get("_name_", type(conditioner).__name__)) if isinstance(node, Mapping) else str(node)


@dataclass
class FirstStage:
    """The autoencoder as written into the folder: the diffusers VAE, its subfolder and how
    unfog's normalisation was carried over (``folded``: ``post_quant_conv``, ``scaling_factor``)."""

    vae: Any
    subfolder: str
    folded: str
    how: str

    def record(self, latent: Any, out: Path) -> dict[str, Any]:
        """What ``unfog.json`` says about the autoencoder (with the written weights' SHA-256)."""
        weights = sorted((out / self.subfolder).glob("*.safetensors"))
        return {
            "name": latent.name, **latent.describe(),
            "diffusers_class": type(self.vae).__name__, "subfolder": self.subfolder,
            "scaling_factor": float(self.vae.config.scaling_factor), "folded": self.folded, "normalization": self.how,
            "weights_sha256": sha256_of(weights[0]) if len(weights) == 1 else sha256_of(out / self.subfolder),
        }


def _latent_target(diffusers: Any, pipeline: DiffusionPipeline, net: Any,
                   counterpart: DiffusersScheduler) -> tuple[Any, dict[str, Any], FirstStage]:
    """The pipeline class, its components (scheduler aside) and the first stage for a latent model."""
    lo_hi = pipeline.data_range
    if lo_hi is not None and tuple(lo_hi) != (-1.0, 1.0):
        raise ConfigError(
            f"diffusers' latent pipelines return the decoded images as (x/2 + 1/2) clamped to [0, 1], i.e. data in "
            f"[-1, 1], but this model's data range is [{lo_hi[0]}, {lo_hi[1]}]; use format=safetensors."
        )
    dit = type(net).__name__ == "DiTTransformer2DModel"
    if dit and float(counterpart.call.get("eta", 0.0)):
        raise ConfigError(
            f"DiTPipeline passes no eta to its scheduler, so it runs DDIM with eta=0, not this sampler's "
            f"eta={counterpart.call['eta']}; export with sampler.eta=0, or use format=safetensors."
        )
    stage = _first_stage(pipeline.latent, "vae" if dit else "vqvae")
    if dit:
        return diffusers.DiTPipeline, {"transformer": _dit_with_label_table(pipeline.model, net),
                                       "vae": stage.vae}, stage
    return diffusers.LDMPipeline, {"vqvae": stage.vae, "unet": net}, stage


def _first_stage(latent: Any, subfolder: str) -> FirstStage:
    """The latent space's autoencoder as a diffusers VAE that decodes unfog's normalised latents
    after the pipeline divides them by its ``scaling_factor``."""
    shift = latent.shift.detach().double().cpu()
    scale = latent.scale.detach().double().cpu()
    held = getattr(latent.autoencoder, "vae", None)  # diffusers_vae holds a diffusers VAE
    if held is not None:
        vae = held
    elif latent.name == "kl":
        from unfog_diffusers.vae import kl_to_diffusers

        vae = kl_to_diffusers(latent.autoencoder)
    else:
        raise ConfigError(
            f"format=diffusers writes the autoencoder as a diffusers AutoencoderKL; autoencoder {latent.name!r} has "
            f"no diffusers counterpart (kl and diffusers_vae have). Use format=safetensors."
        )
    factor = float(vae.config.scaling_factor)
    if not float(getattr(vae.config, "shift_factor", None) or 0.0) and not shift.any() \
            and bool((scale.float() == torch.tensor(factor, dtype=torch.float32)).all()):
        return FirstStage(vae, subfolder, "scaling_factor",
                          f"by the VAE's own scaling_factor, z_n = z × {factor:g}, which the pipeline divides by")
    if held is not None:
        vae = copy.deepcopy(held)
    vae = _fold_target(vae, latent)
    fold_normalization(vae, shift, scale)
    return FirstStage(vae, subfolder, "post_quant_conv",
                      "per channel, z_n = (z − shift) · scale, which one scaling_factor cannot express: it is folded "
                      "into the VAE's 1×1 post_quant_conv (W' = W·diag(1/scale), b' = W·shift + b) and "
                      "scaling_factor is 1, so decode(z_n) decodes unfog's latents")


def _fold_target(vae: Any, latent: Any) -> Any:
    """``vae`` with a 1×1 ``post_quant_conv`` to fold into: its own, or an identity one added to an
    AutoencoderKL built without one; a ConfigError for a VAE that has no such first layer."""
    if getattr(vae, "post_quant_conv", None) is not None:
        return vae
    if type(vae).__name__ != "AutoencoderKL":
        raise ConfigError(
            f"the {type(vae).__name__} of autoencoder {latent.name!r} decodes through a nonlinearity first, so "
            f"unfog's per-channel normalisation (shift {_numbers(latent.shift)}, scale {_numbers(latent.scale)}) "
            f"cannot be folded into it, and diffusers divides latents by one scaling_factor "
            f"({float(vae.config.scaling_factor):g}); train with latents.normalize=fixed, or use format=safetensors."
        )
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    added = type(vae).from_config({**config, "use_post_quant_conv": True})
    state = dict(vae.state_dict())
    c = int(vae.config.latent_channels)
    state["post_quant_conv.weight"] = torch.eye(c).reshape(c, c, 1, 1)
    state["post_quant_conv.bias"] = torch.zeros(c)
    added.load_state_dict(state, strict=True)
    return _like(added, vae)


@torch.no_grad()
def fold_normalization(vae: Any, shift: torch.Tensor, scale: torch.Tensor) -> None:
    """Fold z = z_n / scale + shift into ``vae.post_quant_conv`` (y = W·z + b), in float64:
    W' = W·diag(1/scale), b' = W·shift + b; then ``scaling_factor`` 1 (and no shift_factor or
    latents_mean/std), so ``vae.decode(z_n)`` is the decoding of unfog's normalised latents."""
    conv = vae.post_quant_conv
    w = conv.weight.detach().double().cpu()[:, :, 0, 0]
    b = conv.bias.detach().double().cpu()
    conv.weight.copy_((w / scale.double()[None, :])[:, :, None, None].to(conv.weight))
    conv.bias.copy_((b + w @ shift.double()).to(conv.bias))
    reset = {"scaling_factor": 1.0, "shift_factor": None, "latents_mean": None, "latents_std": None}
    vae.register_to_config(**{k: v for k, v in reset.items() if k == "scaling_factor" or k in vae.config})


def _like(model: Any, original: Any) -> Any:
    """``model`` on ``original``'s device and dtype, in eval mode (cast only where the dtype differs:
    diffusers warns about casting a float32 model)."""
    param = next(original.parameters())
    if next(model.parameters()).dtype != param.dtype:
        model = model.to(dtype=param.dtype)
    return model.to(param.device).eval()


def _numbers(values: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values.tolist()) + "]"


@torch.no_grad()
def _dit_with_label_table(model: Any, net: Any) -> Any:
    """The model's DiT with diffusers' own label table (``num_embeds_ada_norm`` 1000), as
    DiTPipeline feeds it class ids, computing what unfog computes.

    unfog's class-conditional DiT embeds a label with its ``class_label`` conditioner and each
    block's Linear (``_VectorLabels``); an affine map of a table row is a table row, so each
    block's table gets row k = Linear(embedding(k)) for the classes, and row 1000 (DiTPipeline's
    unconditional class) the one of unfog's null class; rows in between repeat it. An
    unconditional DiT passes one fixed label: every row is that label's embedding."""
    backbone = model.backbone
    config = {k: v for k, v in net.config.items() if not k.startswith("_")}
    dit = type(net).from_config({**config, "num_embeds_ada_norm": DIT_LABELS})
    state = {k: v for k, v in net.state_dict().items() if ".class_embedder." not in k}
    conditioners = list(model.conditioners.values())
    vectors = None
    if conditioners:
        c = conditioners[0]
        labels = torch.arange(c.num_classes + 1, device=c.embedding.weight.device)  # the last is the null class
        vectors = model.encode({c.field: labels}, len(labels))["vector"]
    for i, block in enumerate(net.transformer_blocks):
        embedder = block.norm1.emb.class_embedder
        if vectors is not None:
            rows = embedder(vectors)
            table = rows[-1:].repeat(DIT_LABELS + 1, 1)
            table[: len(rows) - 1] = rows[:-1]
        else:
            table = embedder.embedding_table.weight[backbone.null_label].expand(DIT_LABELS + 1, -1)
        state[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"] = table.detach().clone()
    dit.load_state_dict(state, strict=True)
    return _like(dit, net)


def _write_id2label(out: Path, pipeline: DiffusionPipeline) -> None:
    """``id2label`` in model_index.json (DiTPipeline's ``labels``, ``get_label_ids``): the class ids as names."""
    classes = pipeline.num_classes or 0
    index = json.loads((out / "model_index.json").read_text())
    index["id2label"] = {str(k): str(k) for k in range(classes)}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _trained_guidance(pipeline: DiffusionPipeline) -> float:
    """The guidance scale the model was trained to sample with (``sampling.guidance``), as one number."""
    if not len(pipeline.model.conditioners):
        return 1.0
    value = (pipeline.config.get("sampling") or {}).get("guidance", "auto")
    if isinstance(value, Mapping):
        return float(next(iter(value.values()), 1.0))
    if isinstance(value, (int, float)):
        return float(value)
    from unfog.building import auto_guidance

    return auto_guidance(pipeline.model)


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


def _pipeline_call(pipeline_cls: Any, counterpart: DiffusersScheduler, clip_range: float | None,
                   pipeline: DiffusionPipeline) -> dict[str, Any]:
    """The pipeline arguments that reproduce the unfog sampler (and, for DiTPipeline, the guidance
    scale the model was trained to sample with). Arguments the pipeline does not take are left out
    (DiTPipeline's eta: the exporter refuses a nonzero one)."""
    params = inspect.signature(pipeline_cls.__call__).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    call = {k: v for k, v in counterpart.call.items() if open_ended or k in params}
    if "use_clipped_model_output" in params:
        # unfog recomputes ε̂ from the clipped x̂₀ (Ho et al. 2020, Sec. 3.3), which diffusers does on request
        call["use_clipped_model_output"] = clip_range is not None
    if "guidance_scale" in params:
        call["guidance_scale"] = _trained_guidance(pipeline)
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


def _unscaled(pipeline: str) -> str | None:
    """What ``pipeline``'s own loop leaves out that scheduler's with ``scaled_input`` need (None: nothing)."""
    return {"DDIMPipeline": "scale_model_input", "DDPMPipeline": "scale_model_input",
            "DiTPipeline": "init_noise_sigma"}.get(pipeline)


def _warn_inexact(counterpart: DiffusersScheduler, sampler: str, pipeline: str, out: Path) -> None:
    """Log what the exported pipeline does not reproduce."""
    if not counterpart.exact and counterpart.scheduler in STRIDED:
        log.warning("diffusers' %s steps from timestep τ to τ - T//steps, which matches unfog's %s only for "
                    "leading spacing, or trailing with T divisible by the steps; the export is close, not exact.",
                    counterpart.scheduler, sampler)
    missing = _unscaled(pipeline)
    if counterpart.scaled_input and missing == "scale_model_input":
        log.warning("%s needs scale_model_input, which %s does not call; drive pipe.unet and pipe.scheduler "
                    "yourself (see %s).", counterpart.scheduler, pipeline, out / "README.md")
    elif counterpart.scaled_input and missing:
        log.warning("%s needs the initial noise scaled by scheduler.init_noise_sigma, which %s does not do; "
                    "drive pipe.transformer and pipe.scheduler yourself (see %s).", counterpart.scheduler, pipeline,
                    out / "README.md")


def _readme(pipeline: str, sampler: str, counterpart: DiffusersScheduler, call: Mapping[str, Any],
            stage: FirstStage | None = None, model: DiffusionPipeline | None = None) -> str:
    """The folder's README: how to load and call the pipeline, how close it is to unfog's sampler,
    and for a latent model how the autoencoder decodes unfog's latents."""
    scheduler = counterpart.scheduler
    args = ", ".join(f"{k}={v!r}" for k, v in call.items() if v is not None)
    first = "batch_size=4"
    if pipeline == "DiTPipeline":
        first = "class_labels=[0, 1, 2, 3]" if model is not None and model.num_classes else "class_labels=[0, 0, 0, 0]"
    lines = [
        "# Exported from unfog", "",
        f"A `{pipeline}` with a `{scheduler}` (unfog sampler `{sampler}`) on the model's own betas.", "",
        "```python", "import diffusers",
        'pipe = diffusers.DiffusionPipeline.from_pretrained("THIS_FOLDER")',
        f"images = pipe({first}, {args}).images", "```", "",
        "Timesteps follow diffusers' convention: unfog's grid point t = i/T is diffusers' timestep i - 1.",
        "unfog starts from sigma(1) times standard noise; diffusers' pipelines from standard noise.",
    ]
    if counterpart.exact:
        lines.append(f"With these arguments `{scheduler}` takes the same steps as unfog's `{sampler}`.")
    elif scheduler in STRIDED:
        lines.append(f"With this spacing and step count `{scheduler}` takes steps close to, not equal to, unfog's.")
    else:
        lines.append(f"`{scheduler}` is diffusers' implementation of the method, not step for step unfog's.")
    missing = _unscaled(pipeline) if counterpart.scaled_input else None
    if missing == "scale_model_input":
        lines += ["", f"`{pipeline}` does not call `scheduler.scale_model_input` or scale the initial noise by",
                  "`scheduler.init_noise_sigma`, which this scheduler needs: run the loop yourself."]
    elif missing:
        lines += ["", f"`{pipeline}` does not scale the initial noise by `scheduler.init_noise_sigma`, which this",
                  "scheduler needs: run the loop yourself."]
    if stage is not None and model is not None:
        lines += ["", *_latent_readme(pipeline, stage, model)]
    return "\n".join(lines) + "\n"


def _latent_readme(pipeline: str, stage: FirstStage, model: DiffusionPipeline) -> list[str]:
    """The README's paragraph on the first stage of a latent model."""
    latent = model.latent
    shape = "×".join(str(s) for s in latent.latent_shape)
    lines = [
        "## Latent model", "",
        f"The network draws latents of shape {shape}; `{stage.subfolder}/` decodes them: unfog's autoencoder "
        f"`{latent.name}` (weights sha256 {latent.sha256[:16]}…) as a diffusers `{type(stage.vae).__name__}`.",
        f"unfog normalises latents {stage.how}.",
    ]
    if stage.folded == "post_quant_conv":
        lines += [f"`{stage.subfolder}.encode` still gives unnormalised latents z: normalise them, (z − shift) · scale "
                  "(shift and scale in unfog.json), before `decode`."]
    lines += ["The pipeline returns the decoded images as (x/2 + 1/2) clamped to [0, 1]: unfog's samples, clamped to "
              "the data range [-1, 1], mapped to [0, 1]. Latents are not clipped (clip_sample is false)."]
    if pipeline == "LDMPipeline":
        lines += ["", "diffusers logs `Expected types for vqvae: VQModel, got AutoencoderKL`: LDMPipeline runs any VAE "
                      "with `decode` and `config.scaling_factor`. It passes no generator to `scheduler.step`, so with "
                      "eta > 0 or DDPM the step noise comes from torch's global generator."]
    else:
        lines += ["", f"`guidance_scale` g > 1 is unfog's guidance=g (u + g·(c − u)); DiTPipeline uses class id "
                      f"{DIT_LABELS} for the unconditional half. g ≤ 1 draws conditionally (unfog's guidance=1)."]
        if not model.num_classes:
            lines.append("The model is unconditional: every class id gives the same embedding.")
    return lines
