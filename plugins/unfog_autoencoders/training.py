"""Training a first-stage autoencoder (``unfog train-autoencoder``) and measuring how well it
reconstructs held-out images.

:class:`AutoencoderRecipe` runs one training as ``unfog train`` runs one: the config is checked
before anything is built, the run is seeded, trained by Lightning with the kernel's atomic
checkpoints, clean stop on Ctrl-C/SIGTERM and resumable data order, and every step reseeds from
(seed, step), so a run resumed from any checkpoint ends with the weights of an uninterrupted one.
:class:`AutoencoderModule` is the Lightning module: LDM's objective (:mod:`unfog_autoencoders.losses`)
with two Adam optimizers, the autoencoder's and a PatchGAN discriminator's. The finished
autoencoder is written as ``autoencoder.safetensors`` + ``autoencoder.json``, the folder that
``autoencoder=NAME autoencoder.weights=DIR`` loads. :func:`reconstruction_metrics` (PSNR, SSIM,
feature Fréchet distance) is what the command reports and what benchmarks call.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import signal
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import MISSING
from torch import Tensor, nn

from unfog.callbacks import AtomicCheckpointIO, GracefulStop, StepProgressBar
from unfog.checkpoints import KEY, read_checkpoint
from unfog.config import NAME_KEY, build, plain
from unfog.data import step_seed
from unfog.errors import ConfigError, DataError, Interrupted, NonFiniteLossError
from unfog.images import image_grid, save_png, visible
from unfog.loggers import build_logger
from unfog.schemas import CheckpointConfig, above, at_least, check_config, checked_by
from unfog.training import count_in_state_dict, train_loader
from unfog.util import resolve_device, sha256_of, versions
from unfog_autoencoders.losses import (
    PERCEPTUAL_EXTRACTORS,
    RECONSTRUCTIONS,
    Distance,
    PatchDiscriminator,
    adaptive_weight,
    decoder_last_layer,
    generator_loss,
    hinge_discriminator_loss,
    kl_divergence,
    patch_grid,
    perceptual_distance,
    reconstruction_loss,
)
from unfog_metrics.classifier import held_out_split
from unfog_metrics.distribution import feature_statistics, frechet_distance
from unfog_metrics.features import FeatureExtractor, extractor_from

WEIGHTS_FILE = "autoencoder.safetensors"
RECORD_FILE = "autoencoder.json"
PICTURE_FILE = "reconstructions.png"
FORMAT = "unfog-autoencoder"
FORMAT_VERSION = 1
COMMAND = "train-autoencoder"
EVAL_EXTRACTORS = ("classifier", "inception")

# With manual optimization Lightning warns that a checkpoint written every n steps holds the weights
# after that step's update; that is the point: a checkpoint at step n holds n updates, and resumes there.
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps")

# ----------------------------------------------------------------------------------- settings


def _choice(*options: str) -> dict[str, Any]:
    def check(value: Any, key: str) -> None:
        if value not in options:
            raise ConfigError(f"{key}={value!r}; choose one of {', '.join(options)}.")

    return checked_by(check)


def _flag(value: Any, key: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}; give true or false.")


def _betas(value: Any, key: str) -> None:
    v = list(value) if isinstance(value, (list, tuple)) else None
    if (v is None or len(v) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in v)
            or not all(0.0 <= b < 1.0 for b in v)):
        raise ConfigError(f"{key}={value!r}; give two numbers in [0, 1), e.g. {key}=[0.5,0.9] (LDM's).")


def _device(value: Any, key: str) -> None:
    if not isinstance(value, str) or not (value in ("auto", "cpu", "cuda") or value.startswith("cuda:")):
        raise ConfigError(f"{key}={value!r}; choose auto, cpu, cuda or cuda:N.")


@dataclass
class DiscriminatorConfig:
    """LDM's PatchGAN: its share of the loss (0: none), the step it starts at and its size."""

    weight: float = field(default=0.0, metadata=at_least(0.0, "0 turns it off; LDM: 0.5"))
    start_step: int = field(default=0, metadata=at_least(0))
    layers: int = field(default=3, metadata=at_least(1))
    channels: int = field(default=64, metadata=at_least(1))


@dataclass
class PerceptualConfig:
    """A perceptual term: the squared distance of features of image and reconstruction (0: none)."""

    weight: float = field(default=0.0, metadata=at_least(0.0, "0 turns it off; LDM: 1 with lpips"))
    extractor: str = field(default="classifier", metadata=_choice(*PERCEPTUAL_EXTRACTORS))
    extractor_weights: str | None = None


@dataclass
class AutoencoderLossConfig:
    """LDM's first-stage objective: reconstruction + kl_weight·KL (+ perceptual) (+ adversarial)."""

    reconstruction: str = field(default="l1", metadata=_choice(*RECONSTRUCTIONS))
    kl_weight: float = field(default=1e-6, metadata=at_least(0.0, "LDM: 1e-6"))
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)


@dataclass
class AutoencoderEvalConfig:
    """The reconstruction metrics on held-out data written to autoencoder.json."""

    samples: int = field(default=1000, metadata=at_least(0, "0: no metrics"))
    batch_size: int = field(default=100, metadata=at_least(1))
    extractor: str = field(default="classifier", metadata=_choice(*EVAL_EXTRACTORS))
    extractor_weights: str | None = None  # a `unfog train-classifier` folder (or Inception weights): the FD
    grid: int = field(default=8, metadata=at_least(0, "0: no picture"))


@dataclass
class TrainAutoencoderConfig:
    """Root of ``unfog train-autoencoder``."""

    dataset: Any = MISSING
    autoencoder: Any = MISSING
    logger: Any = None
    output_dir: str | None = None
    steps: int = field(default=2000, metadata=at_least(1))
    batch_size: int = field(default=32, metadata=at_least(1))
    lr: float = field(default=1e-3, metadata=above(0.0))
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9], metadata=checked_by(_betas))
    seed: int = field(default=0, metadata=at_least(0))
    device: str = field(default="auto", metadata=checked_by(_device))
    num_workers: int = field(default=0, metadata=at_least(0))
    log_every_n_steps: int = field(default=25, metadata=at_least(1))
    progress_bar: bool = field(default=True, metadata=checked_by(_flag))
    verbose: bool = field(default=False, metadata=checked_by(_flag))
    ckpt_path: str | None = None
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    eval: AutoencoderEvalConfig = field(default_factory=AutoencoderEvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def _integer_fields(cfg: Mapping[str, Any], schema: type, prefix: str = "") -> None:
    """The ranges say "at least 1"; an integer setting must also be an integer (steps=2.5 is refused)."""
    for f in dataclasses.fields(schema):
        value, key = cfg.get(f.name), f"{prefix}{f.name}"
        nested = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
        if nested is not None:
            if isinstance(value, Mapping):
                _integer_fields(value, nested, f"{key}.")
        elif f.type in (int, "int") and f.name in cfg and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{key}={value!r}; give a whole number.")


# ------------------------------------------------------------------------------------- module


class AutoencoderModule(L.LightningModule):
    """Trains an autoencoder with LDM's first-stage objective (Rombach et al. 2022, App. G;
    ``LPIPSWithDiscriminator``): per image Σ|x − x̂| (or squared) + ``perceptual_weight`` ·
    the perceptual distance per pixel + ``kl_weight`` · KL(q(z|x) ‖ N(0, I)), the latent drawn
    from the posterior; from ``disc_start`` on, + λ · −E[D(x̂)] with λ the adaptive weight times
    ``disc_weight``, and the discriminator D trained on the hinge loss in the same step.

    Manual optimization with two Adam optimizers. The discriminator's step goes through the
    strategy (precision plugins apply) without counting as a training step, so ``global_step``
    counts batches. The global RNG is reseeded from (seed, batches trained, rank) before every
    batch, and that count is saved in checkpoints, so a resumed run draws the same latents.
    """

    def __init__(self, autoencoder: nn.Module, data_shape: Sequence[int], *, reconstruction: str = "l1",
                 kl_weight: float = 1e-6, discriminator: nn.Module | None = None, disc_weight: float = 0.0,
                 disc_start: int = 0, perceptual: Distance | None = None, perceptual_weight: float = 0.0,
                 lr: float = 1e-3, betas: Sequence[float] = (0.5, 0.9), seed: int = 0,
                 meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.autoencoder = autoencoder
        self.discriminator = discriminator
        self.data_shape = tuple(data_shape)
        self.reconstruction, self.kl_weight = reconstruction, kl_weight
        self.disc_weight, self.disc_start = disc_weight, disc_start
        self._perceptual = perceptual  # a frozen network held outside the state dict
        self.perceptual_weight = perceptual_weight
        self.lr, self.betas, self.seed = lr, tuple(betas), seed
        self.meta = meta or {}
        self._last_layer: tuple[Tensor, ...] = ()  # a tuple, so the weight is not registered here a second time
        count_in_state_dict(self, "batches_seen")

    @property
    def batches_trained(self) -> int:
        """Batches trained so far (restored with a checkpoint); what the data order continues from."""
        return self._batches_seen

    def gan_active(self, step: int) -> bool:
        """Whether the adversarial term and the discriminator train at ``step`` (counted from 0)."""
        return self.discriminator is not None and step >= self.disc_start

    def on_fit_start(self) -> None:
        if self.discriminator is not None:  # found once, in eval mode; every batch reseeds afterwards
            was = self.autoencoder.training
            self.autoencoder.eval()
            latent = torch.zeros(1, *self.autoencoder.latent_shape(self.data_shape), device=self.device)
            self._last_layer = (decoder_last_layer(self.autoencoder, latent),)
            self.autoencoder.train(was)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(step_seed(self.seed, self.batches_trained, self.global_rank))

    def losses(self, x: Tensor, step: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The autoencoder's loss at ``step``, the reconstructions, and the terms to log."""
        posterior = self.autoencoder.encode(x)
        z = posterior.mean + posterior.std * torch.randn_like(posterior.mean)
        x_rec = self.autoencoder.decode(z)
        per_image = reconstruction_loss(x, x_rec, self.reconstruction)
        logs: dict[str, Tensor] = {"train/rec_loss": per_image.mean().detach() / x[0].numel()}
        if self._perceptual is not None and self.perceptual_weight > 0:
            p = self._perceptual(x, x_rec)
            logs["train/perceptual"] = p.mean().detach()
            per_image = per_image + self.perceptual_weight * x[0].numel() * p  # LDM adds it at every pixel
        nll = per_image.mean()
        kl = kl_divergence(posterior.mean, posterior.std)
        loss = nll + self.kl_weight * kl
        logs["train/kl"] = kl.detach()
        if self.gan_active(step):
            assert self.discriminator is not None and self._last_layer
            self.discriminator.requires_grad_(False)
            g = generator_loss(self.discriminator(x_rec))
            self.discriminator.requires_grad_(True)
            weight = adaptive_weight(nll, g, self._last_layer[0], self.disc_weight)
            loss = loss + weight * g
            logs |= {"train/g_loss": g.detach(), "train/d_weight": weight}
        return loss, x_rec, logs

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        step = self.global_step
        x = batch["x"]
        optimizers = self.optimizers()
        opt_ae = optimizers[0] if isinstance(optimizers, list) else optimizers
        loss, x_rec, logs = self.losses(x, step)
        self._check_finite(loss, "autoencoder")
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt_ae.step()
        if self.gan_active(step):
            opt_d = optimizers[1]
            d_loss = hinge_discriminator_loss(self.discriminator(x.detach()), self.discriminator(x_rec.detach()))
            self._check_finite(d_loss, "discriminator")
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=_nothing, model=self)
            logs["train/d_loss"] = d_loss.detach()
        self._batches_seen += 1
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.log_dict(logs, on_step=True, on_epoch=False)
        return loss.detach()

    def _check_finite(self, loss: Tensor, which: str) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"The {which} loss became {loss.item()} at step {self.global_step}. Nothing was saved after the last "
                "good checkpoint. Lower lr, or check the data for NaNs; resume with "
                "ckpt_path=<run>/checkpoints/last.ckpt."
            )

    def configure_optimizers(self) -> Any:
        opts = [torch.optim.Adam(self.autoencoder.parameters(), lr=self.lr, betas=self.betas)]
        if self.discriminator is not None:
            opts.append(torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=self.betas))
        return opts

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer
        logged = trainer.callback_metrics if trainer is not None else {}
        scalars = {k: float(v) for k, v in logged.items() if getattr(v, "numel", lambda: 1)() == 1}
        checkpoint[KEY] = {**self.meta, "metrics": scalars}


def _nothing() -> None:
    return None


# ------------------------------------------------------------------------------------ metrics


def _images(data: Any, limit: int | None) -> Tensor:
    """The first ``limit`` images of a dataset of dicts, a batch dict or a tensor, as float32."""
    if isinstance(data, Mapping):
        data = data["x"]
    if isinstance(data, Tensor):
        x = data if limit is None else data[:limit]
        return x.detach().float().cpu()
    n = len(data) if limit is None else min(limit, len(data))
    if n == 0:
        raise DataError("reconstruction_metrics: no images to score.")
    return torch.stack([torch.as_tensor(data[i]["x"]).float() for i in range(n)])


@torch.no_grad()
def reconstructions(autoencoder: Any, images: Tensor, batch_size: int = 64, device: Any = None,
                    data_range: tuple[float, float] | None = (-1.0, 1.0)) -> Tensor:
    """decode(encode(x).mean) of each image (CPU float32), clamped to ``data_range``."""
    device = device if device is not None else _device_of(autoencoder)
    was = getattr(autoencoder, "training", False)
    if isinstance(autoencoder, nn.Module):
        autoencoder.eval()
    try:
        out = [autoencoder.decode(autoencoder.encode(images[i:i + batch_size].to(device)).mean).float().cpu()
               for i in range(0, len(images), batch_size)]
    finally:
        if isinstance(autoencoder, nn.Module):
            autoencoder.train(was)
    rec = torch.cat(out) if out else images.new_empty(0, *images.shape[1:])
    return rec.clamp(*data_range) if data_range is not None else rec


def reconstruction_metrics(autoencoder: Any, data: Any, *, num_samples: int | None = None, batch_size: int = 64,
                           extractor: FeatureExtractor | None = None,
                           data_range: tuple[float, float] = (-1.0, 1.0), device: Any = None) -> dict[str, float]:
    """How well ``autoencoder`` reconstructs ``data``: the posterior mean decoded, clamped to
    ``data_range``, against the originals.

    Args:
        autoencoder: any :class:`unfog.protocols.Autoencoder`.
        data: a dataset of dicts with ``"x"`` (the first ``num_samples`` items are scored), a batch
            dict or an N×C×H×W tensor.
        num_samples: at most this many images (None: all).
        batch_size: images per forward pass.
        extractor: with a :class:`~unfog_metrics.features.FeatureExtractor`, also the Fréchet distance
            between its features of originals and reconstructions (Heusel et al. 2017's formula).
        data_range: the data's value range; its width is PSNR's peak and SSIM's ``data_range``.
        device: where the autoencoder runs (None: where its parameters are).

    Returns:
        ``psnr`` (dB, the mean over images of 10·log₁₀(width² / MSE)), ``ssim`` (the mean over images,
        torchmetrics' Gaussian-window SSIM of Wang et al. 2004), ``fd`` with an extractor, and ``n``.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    x = _images(data, num_samples)
    if x.ndim != 4:
        raise DataError(f"reconstruction_metrics: needs images N×C×H×W; got shape {tuple(x.shape)}.")
    lo, hi = (float(v) for v in data_range)
    rec = reconstructions(autoencoder, x, batch_size, device, (lo, hi))
    mse = (rec.double() - x.clamp(lo, hi).double()).square().flatten(1).mean(dim=1)
    psnr = 10.0 * torch.log10((hi - lo) ** 2 / mse.clamp_min(1e-20))
    ssim = torch.cat([structural_similarity_index_measure(rec[i:i + batch_size], x[i:i + batch_size].clamp(lo, hi),
                                                          data_range=hi - lo, reduction="none").reshape(-1)
                      for i in range(0, len(x), batch_size)])
    out = {"psnr": float(psnr.mean()), "ssim": float(ssim.double().mean()), "n": float(len(x))}
    if extractor is not None:
        if len(x) < 2:
            raise DataError("reconstruction_metrics: the Fréchet distance needs at least 2 images.")
        real, fake = extractor.features(x), extractor.features(rec)
        out["fd"] = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    return out


def _device_of(module: Any) -> torch.device:
    p = next(iter(module.parameters()), None) if isinstance(module, nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


# ------------------------------------------------------------------------------------- recipe


@dataclass
class AutoencoderResult:
    """Where a finished run left the autoencoder, and how well it reconstructs held-out data."""

    out_dir: Path
    name: str
    data_shape: tuple[int, ...]
    latent_shape: tuple[int, ...]
    steps: int
    seconds: float
    metrics: dict[str, float]
    checkpoint: Path


class AutoencoderRecipe:
    """One ``unfog train-autoencoder`` run of a composed config, writing into ``out_dir``:
    :meth:`check` (no data touched), :meth:`data`, :meth:`model`, :meth:`fit`, :meth:`export`."""

    def __init__(self, cfg: Mapping[str, Any], out_dir: Path) -> None:
        self.cfg: dict[str, Any] = plain(cfg)
        self.out_dir = Path(out_dir)
        self.resumed: dict[str, Any] = {}

    def run(self) -> AutoencoderResult:
        """Check, build, train and write the autoencoder; return where it is."""
        self.check()
        self.data()
        self.model()
        self.fit()
        return self.export()

    def check(self) -> None:
        """Every setting, before any data or network is built; the checkpoint to resume from."""
        cfg = self.cfg
        check_config(cfg, TrainAutoencoderConfig)
        _integer_fields(cfg, TrainAutoencoderConfig)
        for kind in ("dataset", "autoencoder"):
            if not isinstance(cfg.get(kind), Mapping) or NAME_KEY not in cfg[kind]:
                raise ConfigError(f"{COMMAND}: no {kind} chosen; add {kind}=NAME (e.g. {kind}="
                                  f"{'shapes' if kind == 'dataset' else 'kl'}).")
        self.device = resolve_device(cfg["device"])
        if cfg["ckpt_path"]:
            ckpt = read_checkpoint(cfg["ckpt_path"], what="ckpt_path", mmap=True)
            meta = ckpt[KEY]
            if meta.get("command") != COMMAND:
                raise ConfigError(
                    f"ckpt_path={cfg['ckpt_path']} is not a checkpoint of `unfog {COMMAND}` (it was written by "
                    f"{meta.get('command') or 'unfog train'}); pass an autoencoder run's checkpoints/last.ckpt."
                )
            self.resumed = {"meta": meta, "step": int(ckpt.get("global_step", 0)),
                            "shapes": {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}}

    def data(self) -> None:
        """Seed the run; build the dataset and split off the held-out data; refuse what is not images."""
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.INFO if self.cfg["verbose"] else logging.WARNING)
        L.seed_everything(self.cfg["seed"], workers=True, verbose=False)
        node = self.cfg["dataset"]
        dataset = build("dataset", node)
        shape = tuple(int(s) for s in dataset.data_shape)
        if len(shape) != 3:
            raise ConfigError(
                f"{COMMAND}: dataset {node[NAME_KEY]!r} gives data of shape {shape}, not images C×H×W; the "
                "autoencoders here are image autoencoders (dataset=shapes, digits, image_folder, cifar10, ...)."
            )
        if dataset.data_range is None:
            raise ConfigError(f"{COMMAND}: dataset {node[NAME_KEY]!r} has no fixed value range; the reconstruction "
                              "metrics (PSNR, SSIM) need one, as image datasets in [-1, 1] have.")
        try:
            self.train_set, self.held_set, self.held_out = held_out_split(node, dataset)
        except ConfigError as exc:  # its messages speak of the classifier
            raise ConfigError(str(exc).replace("train-classifier:", f"{COMMAND}:").replace(
                "held-out accuracy", "held-out reconstruction metrics")) from None
        self.dataset, self.data_shape = dataset, shape
        self.data_range = (float(dataset.data_range[0]), float(dataset.data_range[1]))

    def model(self) -> None:
        """The autoencoder (refusing a lossless one), the discriminator, the perceptual network and
        the Lightning module around them."""
        cfg, loss = self.cfg, self.cfg["loss"]
        node = cfg["autoencoder"]
        self.name = node[NAME_KEY]
        ae = build("autoencoder", node, data_shape=self.data_shape)
        if getattr(ae, "lossless", False):
            raise ConfigError(
                f"{COMMAND}: autoencoder={self.name} is lossless (pixel space): it has nothing to learn. Choose a "
                "trainable one, e.g. autoencoder=kl autoencoder.factor=4."
            )
        if not isinstance(ae, nn.Module) or not any(p.requires_grad for p in ae.parameters()):
            raise ConfigError(f"{COMMAND}: autoencoder={self.name} has no trainable parameters (it is not a "
                              "torch nn.Module with weights); nothing to train.")
        self.autoencoder = ae
        self.latent_shape = tuple(int(s) for s in ae.latent_shape(self.data_shape))
        disc_cfg = loss["discriminator"]
        discriminator = None
        if disc_cfg["weight"] > 0:
            side = patch_grid(min(self.data_shape[1:]), disc_cfg["layers"])
            if side < 1:
                fits = max((n for n in range(1, disc_cfg["layers"]) if patch_grid(min(self.data_shape[1:]), n) >= 1),
                           default=None)
                raise ConfigError(
                    f"loss.discriminator.layers={disc_cfg['layers']} halves {self.data_shape[1]}×{self.data_shape[2]} "
                    f"images below one patch; "
                    + (f"use loss.discriminator.layers={fits} or fewer." if fits else "the images are too small for "
                       "a discriminator; set loss.discriminator.weight=0.")
                )
            discriminator = PatchDiscriminator(self.data_shape[0], disc_cfg["channels"], disc_cfg["layers"])
        perc_cfg = loss["perceptual"]
        perceptual, self.perceptual_about = None, None
        if perc_cfg["weight"] > 0:
            perceptual, self.perceptual_about = perceptual_distance(
                perc_cfg["extractor"], perc_cfg["extractor_weights"], self.data_shape, self.device)
        ev = cfg["eval"]
        self.eval_extractor = None
        if ev["extractor_weights"] and ev["samples"] > 0:  # loaded now, so a bad folder fails before training
            self.eval_extractor = extractor_from(ev["extractor"], ev["extractor_weights"], device=str(self.device),
                                                 batch_size=ev["batch_size"])
            takes = getattr(self.eval_extractor, "data_shape", None)
            if takes is not None and tuple(takes) != self.data_shape:
                raise ConfigError(
                    f"eval.extractor_weights: the classifier at {ev['extractor_weights']} takes images of shape "
                    f"{tuple(takes)}, this dataset's are {self.data_shape}; train one on this dataset "
                    f"(`unfog train-classifier dataset=...` with the same settings)."
                )
        self.meta = {
            "command": COMMAND, "config": cfg, "versions": versions(),
            "wiring": {"data_shape": list(self.data_shape), "latent_shape": list(self.latent_shape),
                       "data_range": list(self.data_range)},
        }
        self.module = AutoencoderModule(
            ae, self.data_shape, reconstruction=loss["reconstruction"], kl_weight=loss["kl_weight"],
            discriminator=discriminator, disc_weight=disc_cfg["weight"], disc_start=disc_cfg["start_step"],
            perceptual=perceptual, perceptual_weight=perc_cfg["weight"], lr=cfg["lr"], betas=cfg["betas"],
            seed=cfg["seed"], meta=self.meta,
        )
        if self.resumed:
            self._check_resumable()
        self.meta["run_id"] = (self.resumed.get("meta") or {}).get("run_id") or secrets.token_hex(4)
        params = sum(p.numel() for p in ae.parameters())
        print(f"unfog: data {node_name(cfg['dataset'])} ({len(self.train_set)} training items of "
              f"{'×'.join(map(str, self.data_shape))}); autoencoder {self.name} {params / 1e6:.2f} M parameters, "
              f"latents {'×'.join(map(str, self.latent_shape))}", flush=True)

    def _check_resumable(self) -> None:
        saved = self.resumed["shapes"]
        built = {k: tuple(v.shape) for k, v in self.module.state_dict().items()}
        if saved == built:
            return
        then = _flat(self.resumed["meta"].get("config", {}))
        now = _flat(self.cfg)
        differ = [f"{k}={now.get(k)!r} (checkpoint: {v!r})" for k, v in then.items()
                  if k.split(".")[0] in ("autoencoder", "dataset", "loss") and now.get(k) != v]
        raise ConfigError(
            f"ckpt_path={self.cfg['ckpt_path']}: this config builds other networks than the checkpoint's "
            f"(only in the checkpoint: {sorted(set(saved) - set(built))[:3]}; only here: "
            f"{sorted(set(built) - set(saved))[:3]}; other shapes: "
            f"{sorted(k for k in set(saved) & set(built) if saved[k] != built[k])[:3]}). Settings that differ: "
            f"{'; '.join(differ[:8]) or 'none found'}. Resume with the checkpoint's settings (the run's "
            ".hydra/config.yaml)."
        )

    def fit(self) -> None:
        """Train to ``steps``; ``checkpoints/last.ckpt`` at the end, or at the step where Ctrl-C or
        SIGTERM stopped it (then :class:`Interrupted`)."""
        cfg = self.cfg
        ckpt_dir = self.out_dir / "checkpoints"
        self.stop = GracefulStop(ckpt_dir / "last.ckpt")
        callbacks: list[Any] = [
            ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                            every_n_train_steps=cfg["checkpoint"]["every_n_steps"]),
            self.stop,
        ]
        if cfg["progress_bar"]:
            callbacks.append(StepProgressBar(refresh_rate=cfg["log_every_n_steps"]))
        logger = build_logger(cfg.get("logger"), self.out_dir, config={**cfg, "versions": self.meta["versions"]},
                              run_id=self.meta["run_id"], resume=bool(cfg["ckpt_path"]),
                              verbose=cfg["verbose"], resume_step=self.resumed.get("step", 0))
        accelerator, devices = _accelerator(self.device)
        loader = train_loader(self.train_set, cfg["batch_size"], cfg["num_workers"], cfg["seed"], self.module)
        trainer = L.Trainer(accelerator=accelerator, devices=devices, precision="32-true", max_steps=cfg["steps"],
                            max_epochs=-1, logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                            default_root_dir=str(self.out_dir), log_every_n_steps=cfg["log_every_n_steps"],
                            enable_progress_bar=cfg["progress_bar"], enable_model_summary=False,
                            num_sanity_val_steps=0, use_distributed_sampler=False)
        start = time.perf_counter()
        trainer.fit(self.module, loader, ckpt_path=cfg["ckpt_path"], weights_only=True)  # checkpoints are untrusted
        self.seconds = time.perf_counter() - start
        self.steps = trainer.global_step
        self.last = ckpt_dir / "last.ckpt"
        if logger and type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()
        if self.stop.signal_number is not None:
            name = signal.Signals(self.stop.signal_number).name
            raise Interrupted(f"stopped by {name} at step {self.stop.step}; the checkpoint {self.last} holds that "
                              f"step. Resume with the same command and ckpt_path={self.last}.",
                              self.stop.signal_number)
        trainer.save_checkpoint(self.last, weights_only=False)

    def export(self) -> AutoencoderResult:
        """Write the weights, their record and the picture; score the held-out data."""
        from safetensors.torch import save_file

        ae = self.autoencoder.to(self.device)
        ev = self.cfg["eval"]
        metrics: dict[str, float] = {}
        held = None
        if ev["samples"] > 0:
            held = _images(self.held_set, ev["samples"])
            metrics = reconstruction_metrics(ae, held, batch_size=ev["batch_size"], extractor=self.eval_extractor,
                                             data_range=self.data_range, device=self.device)
        if ev["grid"] > 0:
            originals = held[:ev["grid"]] if held is not None else _images(self.held_set, ev["grid"])
            rec = reconstructions(ae, originals, ev["batch_size"], self.device, self.data_range)
            grid = image_grid(torch.cat([originals, rec]), nrow=len(originals), value_range=self.data_range)
            save_png(visible(grid), self.out_dir / PICTURE_FILE)
        weights = self.out_dir / WEIGHTS_FILE
        state = {k: v.detach().cpu().contiguous() for k, v in ae.state_dict().items()}
        # One metadata key: safetensors writes several in no fixed order, which would change the hash.
        save_file(state, str(weights), metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})
        sha256 = sha256_of(weights)
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": {NAME_KEY: self.name, **ae.settings()},
            "data_shape": list(self.data_shape),
            "latent_shape": list(self.latent_shape),
            "data_range": list(self.data_range),
            "dataset": self.cfg["dataset"],
            "weights": WEIGHTS_FILE,
            "sha256": sha256,
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "metrics": metrics,
            "protocol": self._protocol(metrics),
            "train": {k: self.cfg[k] for k in ("batch_size", "lr", "betas", "seed", "loss")}
                     | {"device": str(self.device), "resumed_from": self.cfg["ckpt_path"]},
            "versions": self.meta["versions"],
        }
        (self.out_dir / RECORD_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n",
                                                encoding="utf-8")
        return AutoencoderResult(self.out_dir, self.name, self.data_shape, self.latent_shape, self.steps,
                                 self.seconds, metrics, self.last)

    def _protocol(self, metrics: Mapping[str, float]) -> dict[str, Any]:
        ev = self.cfg["eval"]
        held = {**self.held_out, "n": int(metrics.get("n", 0)),
                "chosen": f"the first {int(metrics.get('n', 0))} items of the held-out data"}
        width = self.data_range[1] - self.data_range[0]
        out: dict[str, Any] = {
            "held_out": held,
            "reconstruction": "decode(posterior mean), clamped to the data range",
            "data_range": list(self.data_range),
            "psnr": f"mean over images of 10·log10({width:g}² / MSE)",
            "ssim": f"torchmetrics structural_similarity_index_measure, data_range={width:g}, Gaussian window 11, "
                    "σ 1.5; mean over images",
            "fd": None,
            "perceptual_loss": self.perceptual_about,
        }
        if self.eval_extractor is not None:
            about = self.eval_extractor.describe()
            out["fd"] = {"what": "Fréchet distance between features of originals and reconstructions",
                         "extractor": about.get("name"), "weights": about.get("weights"),
                         "weights_sha256": about.get("weights_sha256")}
        elif ev["samples"] > 0:
            out["fd"] = "not computed: give eval.extractor_weights (a `unfog train-classifier` folder)"
        return out


def node_name(node: Mapping[str, Any]) -> str:
    """``NAME(k=v, ...)`` of a component node, for the run's first line."""
    args = ", ".join(f"{k}={v}" for k, v in node.items() if k != NAME_KEY and v is not None)
    return f"{node[NAME_KEY]}({args})" if args else str(node[NAME_KEY])


def _accelerator(device: torch.device) -> tuple[str, Any]:
    if device.type == "cuda":
        return "gpu", [device.index if device.index is not None else 0]
    return "cpu", 1


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def train_autoencoder(cfg: Mapping[str, Any], out_dir: Path) -> AutoencoderResult:
    """Train the autoencoder of ``cfg`` (``unfog train-autoencoder``) into ``out_dir``."""
    return AutoencoderRecipe(cfg, out_dir).run()


__all__ = [
    "AutoencoderModule", "AutoencoderRecipe", "AutoencoderResult", "TrainAutoencoderConfig", "reconstruction_metrics",
    "reconstructions", "train_autoencoder",
]
