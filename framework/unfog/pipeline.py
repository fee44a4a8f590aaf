"""A trained generator: the one object everything that draws samples holds.

``Pipeline.load(path)`` is the only loader and ``pipeline.generate(sampler, n, values, settings)``
the only way to draw: ``unfog sample``, ``unfog evaluate``, ``unfog export``, the sampling and
metric callbacks and the benchmarks all go through it.

A path is read by the first *format* that recognizes it. The kernel's own are a training
checkpoint (``.ckpt``) and a ``unfog export format=safetensors`` folder; a plugin adds one by
registering a ``pipeline`` entry with ``recognizes(path)`` and ``from_path(path, use_ema)``
(:class:`PipelineFormat`) — a pretrained model folder of another program, a chain of
checkpoints — which then loads through the same call, with no branch here.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from unfog import registry
from unfog.building import build_model, upgrade
from unfog.checkpoints import KEY, read_checkpoint
from unfog.config import build
from unfog.diffusion import sigma_data_of
from unfog.errors import CheckpointError, ConfigError, UnfogError
from unfog.latents import LatentSpace
from unfog.model import DiffusionModel
from unfog.protocols import Sampler
from unfog.sampling import classes_of, draw
from unfog.schemas import SamplingSettings
from unfog.util import sha256_of, version_of

EXPORT_META = "unfog.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_AUTOENCODER = "autoencoder.safetensors"


@runtime_checkable
class PipelineFormat(Protocol):
    """A way of storing a generator on disk that :meth:`Pipeline.load` can read."""

    @classmethod
    def recognizes(cls, path: Path) -> bool: ...

    @classmethod
    def from_path(cls, path: Path, *, use_ema: bool = True) -> Pipeline: ...


class Pipeline(ABC):
    """A trained generator: what it draws (``data_shape``, ``data_range``, ``sample_rate`` for
    sound), what it is conditioned on (``conditioners``, by name), the resolved config and
    versions that made it, and where it was loaded from (``source``)."""

    data_shape: tuple[int, ...]
    data_range: tuple[float, float] | None
    sample_rate: int | None
    config: dict[str, Any]
    versions: dict[str, str]
    source: str | None

    @property
    @abstractmethod
    def conditioners(self) -> Mapping[str, Any]:
        """The conditioners whose fields :meth:`generate` takes values for, by name."""

    @abstractmethod
    def generate(self, sampler: Sampler, n: int | Sequence[int], values: Mapping[str, Any] | None = None,
                 settings: SamplingSettings | None = None, *, device: Any = None, progress: bool = False) -> Tensor:
        """``n`` samples (or the samples numbered ``n``, a sequence of indices) drawn by
        ``sampler``; ``values`` maps batch fields to one value per sample."""

    @abstractmethod
    def check(self, settings: SamplingSettings) -> None:
        """Refuse settings this generator cannot draw with (guidance for a conditioner it does
        not have, say), before anything is drawn."""

    def to(self, device: Any) -> Pipeline:
        """Move to ``device``; returns ``self``."""
        return self

    def describe(self) -> dict[str, Any]:
        """What a results record says about the generator (source, hashes, schedule, ...)."""
        return {"source": self.source}

    @property
    def num_classes(self) -> int | None:
        """Classes of its label conditioner (a grid's columns), or None."""
        return classes_of(self.conditioners)

    @staticmethod
    def formats() -> list[Any]:
        """The formats :meth:`load` tries, in order: plugins' ``pipeline`` entries first, then
        unfog's own checkpoint and export formats."""
        plugged = [e.obj for e in registry.entries("pipeline") if isinstance(e.obj, PipelineFormat)]
        return [*plugged, CheckpointFormat, ExportFormat]

    @staticmethod
    def load(path: str | Path, *, use_ema: bool = True) -> Pipeline:
        """The generator stored at ``path`` (EMA weights by default), by the first format that
        recognizes it. Files are untrusted: nothing in them runs as code."""
        path = Path(path).expanduser()
        if not path.exists():
            raise CheckpointError(f"checkpoint={path} does not exist; pass a run's checkpoints/last.ckpt or an "
                                  "exported folder.")
        for fmt in Pipeline.formats():
            if fmt.recognizes(path):
                return fmt.from_path(path, use_ema=use_ema)
        names = ", ".join((f.__doc__ or f.__name__).strip().splitlines()[0] for f in Pipeline.formats())
        raise CheckpointError(f"checkpoint={path} is in no format unfog reads ({names}); pass a run's "
                              "checkpoints/last.ckpt or an `unfog export` folder.")


class DiffusionPipeline(Pipeline):
    """One diffusion model: the network (EMA or raw weights) with its conditioners, the noise
    schedule it was trained on, its prediction target and σ_data — and, for a latent model, its
    :class:`LatentSpace`: samples are drawn in latent space and decoded to ``data_shape``."""

    def __init__(self, model: DiffusionModel, schedule: Any, prediction: str, *, data_shape: Sequence[int],
                 data_range: Sequence[float] | None = None, sample_rate: int | None = None,
                 sigma_data: float | None = None, config: Mapping[str, Any] | None = None,
                 versions: Mapping[str, str] | None = None, source: str | None = None, weights: str = "ema",
                 latent: LatentSpace | None = None) -> None:
        self.model = model
        self.latent = latent
        self.schedule = schedule
        self.prediction = prediction
        self.data_shape = tuple(int(s) for s in data_shape)
        self.data_range = (float(data_range[0]), float(data_range[1])) if data_range else None
        self.sample_rate = int(sample_rate) if sample_rate else None
        self.sigma_data = sigma_data_of(schedule, sigma_data)
        self.config = dict(config or {})
        self.versions = dict(versions or {})
        self.source = source
        self.weights = weights

    @property
    def conditioners(self) -> Mapping[str, Any]:
        return self.model.conditioners

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(iter(self.model.parameters()), torch.empty(0)).device

    def to(self, device: Any) -> DiffusionPipeline:
        self.model.to(device)
        if self.latent is not None:
            self.latent.to(device)
        return self

    @property
    def model_shape(self) -> tuple[int, ...]:
        """The shape the diffusion model draws: the latent shape of a latent model, else ``data_shape``."""
        return tuple(self.latent.latent_shape) if self.latent is not None else self.data_shape

    def check(self, settings: SamplingSettings) -> None:
        if not len(self.model.conditioners) and settings.guidance != 1.0:
            raise ConfigError(f"guidance={settings.guidance} needs a conditioner, but this model has none; "
                              "use guidance=1.")
        if len(self.model.conditioners):
            self.model.guidance_plan(settings.guidance)

    def generate(self, sampler: Sampler, n: int | Sequence[int], values: Mapping[str, Any] | None = None,
                 settings: SamplingSettings | None = None, *, device: Any = None, progress: bool = False) -> Tensor:
        settings = settings or SamplingSettings()
        self.check(settings)
        indices = range(n) if isinstance(n, int) else list(n)
        clip = self.data_range if settings.clip and self.data_range else None
        device = device if device is not None else self.device
        decode = None
        if self.latent is not None:  # latents are unbounded: clip the decoded pixels, not x̂₀
            latent = self.latent.to(device)
            values = latent.values_to_latent(values)
            pixel_clip, clip = clip, None

            def decode(z: Tensor) -> Tensor:
                x = latent.decode(z)
                return x.clamp(*pixel_clip) if pixel_clip else x

        return draw(self.model, self.schedule, sampler, self.prediction, self.model_shape, indices,
                    seed=settings.seed, values=values, guidance=settings.guidance, clip=clip,
                    batch_size=settings.batch_size, device=device, sigma_data=self.sigma_data, progress=progress,
                    guidance_rescale=settings.guidance_rescale, guidance_interval=settings.guidance_interval,
                    decode=decode)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "weights": self.weights}
        if self.source and Path(self.source).exists():
            out["sha256"] = sha256_of(self.source)
        out |= {"schedule": self.config.get("schedule"), "prediction": self.prediction,
                "sigma_data": self.sigma_data, "data_shape": list(self.data_shape)}
        if self.latent is not None:
            out["autoencoder"] = {"name": self.latent.name, "sha256": self.latent.sha256,
                                  "latent_shape": list(self.latent.latent_shape), "source": self.latent.source}
        return out

    @property
    def wiring(self) -> dict[str, Any]:
        """What the model was wired to: the data's shape, classes, range and sample rate."""
        out = {"data_shape": list(self.data_shape), "num_classes": self.num_classes,
               "data_range": list(self.data_range) if self.data_range else None, "sample_rate": self.sample_rate}
        if self.latent is not None:
            out["latent_shape"] = list(self.latent.latent_shape)
        return out

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], state: Mapping[str, Tensor] | None, *, source: str | None = None,
                  weights: str = "ema", latent_state: Mapping[str, Tensor] | None = None) -> DiffusionPipeline:
        """Rebuild from what a checkpoint or export stores: ``meta`` (config, wiring, versions,
        and a latent model's ``autoencoder`` record), the model's state dict (None: leave the
        weights as built) and the latent space's (its autoencoder's weights and normalisation)."""
        wiring = dict(meta["wiring"])
        record = meta.get("autoencoder")
        if record is not None and state is not None and not latent_state:
            raise CheckpointError(f"{source or 'the checkpoint'} is a latent model but holds no autoencoder weights "
                                  "(no keys starting 'latent.'); it is incomplete.")
        try:
            cfg = upgrade(meta["config"], wiring)
            model = build_model(cfg, tuple(wiring.get("latent_shape") or wiring["data_shape"]),
                                wiring.get("num_classes"))
            if state is not None:
                model.load_state_dict(dict(state))
            schedule = build("schedule", cfg["schedule"])
            latent = LatentSpace.from_record(record, latent_state) if record is not None else None
        except (UnfogError, RuntimeError, KeyError, TypeError) as exc:
            raise CheckpointError(_cannot_rebuild(source, meta, exc)) from exc
        return cls(model.eval(), schedule, cfg["prediction"], data_shape=wiring["data_shape"],
                   data_range=wiring.get("data_range"), sample_rate=wiring.get("sample_rate"),
                   sigma_data=cfg.get("sigma_data"), config=cfg, versions=meta.get("versions", {}),
                   source=source, weights=weights, latent=latent.eval() if latent is not None else None)

    @classmethod
    def from_module(cls, module: Any) -> DiffusionPipeline:
        """The EMA model of a training module (:class:`unfog.training.DiffusionModule`) as it is
        now, sharing its weights (for sample grids and metrics while training)."""
        meta = module.meta
        wiring = meta.get("wiring", {})
        return cls(module.ema.module, module.schedule, module.prediction, data_shape=wiring["data_shape"],
                   data_range=wiring.get("data_range"), sample_rate=wiring.get("sample_rate"),
                   sigma_data=module.sigma_data, config=meta.get("config", {}), versions=meta.get("versions", {}),
                   latent=getattr(module, "latent", None))

    def save(self, folder: str | Path) -> Path:
        """Write ``model.safetensors`` and ``unfog.json`` into ``folder`` (unfog's export format,
        which :meth:`Pipeline.load` reads back without the training checkpoint); return it."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        # clone: tied weights share storage, which safetensors refuses; each key gets its own copy
        state = {k: v.detach().cpu().clone().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(out / EXPORT_WEIGHTS), metadata={"format": "pt", "producer": "unfog"})
        if self.latent is not None:
            first = {k: v.detach().cpu().clone().contiguous() for k, v in self.latent.state_dict().items()}
            save_file(first, str(out / EXPORT_AUTOENCODER), metadata={"format": "pt", "producer": "unfog"})
        record = {
            "format": "unfog-safetensors",
            "config": self.config,
            "wiring": self.wiring,
            "versions": self.versions,
            "exported_by": {"unfog": version_of("unfog")},
            "source_checkpoint": str(Path(self.source).resolve()) if self.source else None,
            "weights": EXPORT_WEIGHTS,
            "ema": self.weights == "ema",
            "sha256": sha256_of(out / EXPORT_WEIGHTS),
        }
        if self.latent is not None:
            record["autoencoder"] = self.latent.describe()
            record["autoencoder_weights"] = EXPORT_AUTOENCODER
            record["autoencoder_sha256"] = sha256_of(out / EXPORT_AUTOENCODER)
        (out / EXPORT_META).write_text(json.dumps(record, indent=2))
        return out


def _cannot_rebuild(source: str | None, meta: Mapping[str, Any], exc: BaseException) -> str:
    """Why a stored model does not rebuild, with the versions it was written by and those installed."""
    then = dict(meta.get("versions") or {})
    differ = [f"{name} {v} (installed: {version_of(name)})" for name, v in sorted(then.items())
              if name not in ("torch", "lightning") and version_of(name) != v]
    hint = (f" It was written by {', '.join(differ)}; install those versions to load it, or retrain."
            if differ else " Check that the plugins it was trained with are installed (`unfog plugins`).")
    return f"{source or 'the checkpoint'} does not rebuild with the installed components: {str(exc).rstrip('.')}.{hint}"


class CheckpointFormat:
    """a training checkpoint (.ckpt)"""

    @classmethod
    def recognizes(cls, path: Path) -> bool:
        return path.is_file()

    @classmethod
    def from_path(cls, path: Path, *, use_ema: bool = True) -> DiffusionPipeline:
        ckpt = read_checkpoint(path)
        prefix = "ema.module." if use_ema else "model."
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"checkpoint={path} holds no {'EMA' if use_ema else 'raw'} weights "
                                  f"(no keys starting {prefix!r}); it is incomplete.")
        first = {k[len("latent."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("latent.")}
        return DiffusionPipeline.from_meta(ckpt[KEY], state, source=str(path), weights="ema" if use_ema else "raw",
                                           latent_state=first)


class ExportFormat:
    """an `unfog export format=safetensors` folder"""

    @classmethod
    def recognizes(cls, path: Path) -> bool:
        return path.is_dir()

    @classmethod
    def from_path(cls, path: Path, *, use_ema: bool = True) -> DiffusionPipeline:
        if not (path / EXPORT_META).is_file():
            pipeline = (path / "model_index.json").is_file()
            hint = (" It is a diffusers pipeline folder: load it with diffusers, or train from its unet/ with "
                    "backbone=diffusers_folder backbone.path=FOLDER/unet.") if pipeline else ""
            raise CheckpointError(
                f"checkpoint={path} is a folder but not an unfog export (it has no {EXPORT_META}); export one with "
                f"`unfog export checkpoint=PATH format=safetensors`, or pass a run's checkpoints/last.ckpt.{hint}"
            )
        try:
            meta = json.loads((path / EXPORT_META).read_text())
            weights = path / meta.get("weights", EXPORT_WEIGHTS)
        except (ValueError, AttributeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path / EXPORT_META} is not valid JSON ({exc}); export the model again.") from None
        if not weights.is_file():
            raise CheckpointError(f"{weights} is missing; the export in {path} is incomplete. Export it again.")
        if meta.get("sha256") and sha256_of(weights) != meta["sha256"]:
            raise CheckpointError(
                f"{weights} does not match the sha256 recorded in {path / EXPORT_META}; the file was changed or is "
                "incomplete. Export it again."
            )
        state = _read_safetensors(weights)
        first = None
        if meta.get("autoencoder_weights"):
            file = path / meta["autoencoder_weights"]
            if not file.is_file() or sha256_of(file) != meta.get("autoencoder_sha256"):
                raise CheckpointError(f"{file} is missing or does not match the sha256 recorded in "
                                      f"{path / EXPORT_META}; the export is incomplete. Export it again.")
            first = _read_safetensors(file)
        return DiffusionPipeline.from_meta(meta, state, source=str(path), weights="ema" if meta.get("ema", True)
                                           else "raw", latent_state=first)


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors reports a damaged header with several error types
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc}); export it again.") from None

