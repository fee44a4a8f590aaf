"""diffusers' VAEs as unfog autoencoders, and unfog's ``kl`` autoencoder as a diffusers VAE.

``diffusers_vae`` loads an ``AutoencoderKL`` (Stable Diffusion's VAE, say) or an
``AutoencoderTiny`` (TAESD) from a folder on disk, so a latent model can train in the latent
space of a pretrained first stage; :func:`kl_to_diffusers` turns a ``kl`` autoencoder trained
here into diffusers' ``AutoencoderKL`` with the same numbers, for any program that reads them.

diffusers is imported only when one of these is built, so the plugin imports without it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from unfog import register
from unfog.errors import CheckpointError, ConfigError
from unfog.protocols import Posterior
from unfog_diffusers.models import import_diffusers

NAME = "diffusers_vae"
CLASSES: tuple[str, ...] = ("AutoencoderKL", "AutoencoderTiny")
NEEDS_PATH = (
    f"autoencoder={NAME} needs autoencoder.path=DIR (a folder with config.json, e.g. Stable Diffusion's vae/)"
)

# unfog's kl layout → diffusers' AutoencoderKL, applied in order to every state-dict key.
_KL_TO_DIFFUSERS: tuple[tuple[str, str], ...] = (
    (r"^encoder\.down\.(\d+)\.blocks\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.up\.(\d+)\.blocks\.(\d+)\.", r"decoder.up_blocks.\1.resnets.\2."),
    (r"^decoder\.up\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"\.mid\.block1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn\.out\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.shortcut\.", ".conv_shortcut."),
    (r"\.norm_out\.", ".conv_norm_out."),
)


def diffusers_key(key: str) -> str:
    """The name in diffusers' ``AutoencoderKL`` of a ``kl`` autoencoder's state-dict key."""
    for pattern, replacement in _KL_TO_DIFFUSERS:
        key = re.sub(pattern, replacement, key)
    return key


def kl_to_diffusers(ae: nn.Module) -> Any:
    """diffusers' ``AutoencoderKL`` computing exactly what the ``kl`` autoencoder ``ae`` computes.

    The config follows from ``ae.settings()`` and its data shape (one ``DownEncoderBlock2D``/
    ``UpDecoderBlock2D`` per level, ``mid_block_add_attention`` for ``attention``,
    ``scaling_factor`` 1: unfog normalises latents itself); the state dict is renamed key by key
    (:func:`diffusers_key`) and loaded strictly. ``save_pretrained`` on the result writes a
    folder that ``diffusers_vae`` and any diffusers pipeline read.
    """
    diffusers = import_diffusers("kl_to_diffusers")
    arch = ae.settings()  # type: ignore[operator]
    c, h, w = ae.data_shape  # type: ignore[misc]
    levels = len(arch["channel_mult"])
    model = diffusers.AutoencoderKL(
        in_channels=c, out_channels=c, latent_channels=arch["latent_channels"],
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(arch["channels"] * m for m in arch["channel_mult"]),
        layers_per_block=arch["layers_per_block"], norm_num_groups=arch["norm_groups"],
        mid_block_add_attention=arch["attention"], sample_size=h if h == w else (h, w), scaling_factor=1.0,
    )
    param = next(ae.parameters())
    model.load_state_dict({diffusers_key(k): v for k, v in ae.state_dict().items()}, strict=True)
    if param.dtype != model.dtype:  # casting a float32 model warns about modules to keep in float32
        model = model.to(dtype=param.dtype)
    return model.to(param.device).eval()


@register("autoencoder", NAME)
class DiffusersVAE(nn.Module):
    """A diffusers VAE from a folder on disk: ``AutoencoderKL`` (Stable Diffusion's) or ``AutoencoderTiny``.

    ``AutoencoderKL`` is the KL-regularised first stage of latent diffusion (Rombach et al.
    2022): encode gives its diagonal Gaussian posterior's mean and standard deviation.
    ``AutoencoderTiny`` is TAESD (Bohan 2023), a small deterministic distillation of it: encode
    gives its latents with zero standard deviation. Latents are normalised by the VAE's own
    ``scaling_factor`` and ``shift_factor`` (``scale_factor`` and ``shift_factor`` here; 0.18215
    and 0 for Stable Diffusion 1.x), not by statistics of the data. Data lie in [−1, 1].

    Args:
        path: a diffusers model folder (``config.json`` and safetensors weights, as
            ``save_pretrained`` writes) or a pipeline folder with a ``vae/`` subfolder.
        subfolder: the VAE's subfolder of ``path``; None: ``path`` itself if it holds a
            config.json, else ``vae``.
        config: a diffusers config to build an untrained VAE from, with ``class_name`` (what
            :meth:`settings` records; a checkpoint then supplies the weights). Not together
            with ``path``, which has its own.
        class_name: ``AutoencoderKL`` or ``AutoencoderTiny``, with ``config``.
    """

    lossless: ClassVar[bool] = False
    flip_equivariant: ClassVar[bool] = False  # approximately at best: the mirrored images are cached too

    def __init__(self, data_shape: tuple[int, ...], path: str | None = None, subfolder: str | None = None,
                 config: dict | None = None, class_name: str | None = None) -> None:
        super().__init__()
        diffusers = import_diffusers(f"autoencoder={NAME}")
        if path is not None:
            if config is not None or class_name is not None:
                raise ConfigError(
                    f"{NAME}: give either autoencoder.path (a folder, which has its own config) or autoencoder.config "
                    "with autoencoder.class_name (to rebuild without files), not both."
                )
            self.vae = _load_folder(diffusers, Path(path).expanduser(), subfolder)
        elif config is not None and class_name is not None:
            _check_class(class_name, "autoencoder.class_name")
            self.vae = getattr(diffusers, class_name).from_config(dict(config))
        elif config is not None or class_name is not None:
            raise ConfigError(f"{NAME}: autoencoder.config and autoencoder.class_name go together; {NEEDS_PATH}.")
        else:
            raise ConfigError(f"{NEEDS_PATH}.")
        self.vae.requires_grad_(False)
        self.path = path
        self.class_name = type(self.vae).__name__
        self.scale_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.data_shape = self._check_data_shape(data_shape)

    @property
    def factor(self) -> int:
        """How much smaller the latent is than the image along each side."""
        cfg = self.vae.config
        widths = cfg.encoder_block_out_channels if self.class_name == "AutoencoderTiny" else cfg.block_out_channels
        return 2 ** (len(widths) - 1)

    def encode(self, x: Tensor) -> Posterior:
        """The posterior's mean and standard deviation (AutoencoderKL), or the latents with zero
        standard deviation (AutoencoderTiny)."""
        out = self.vae.encode(x)
        if self.class_name == "AutoencoderTiny":
            return Posterior(out.latents, torch.zeros_like(out.latents))
        return Posterior(out.latent_dist.mean, out.latent_dist.std)

    def decode(self, z: Tensor) -> Tensor:
        """Images from (unnormalised) latents."""
        return self.vae.decode(z).sample

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        """(latent_channels, H / factor, W / factor) for images of ``data_shape`` (C, H, W)."""
        f = self.factor
        return (int(self.vae.config.latent_channels), int(data_shape[-2]) // f, int(data_shape[-1]) // f)

    def settings(self) -> dict[str, Any]:
        """The diffusers config (without its ``_`` keys) and class: rebuilds the network with no file."""
        return {"config": _jsonable(self.vae.config), "class_name": self.class_name}

    def _check_data_shape(self, data_shape: Sequence[int] | None) -> tuple[int, ...]:
        shape = tuple(int(s) for s in data_shape) if data_shape is not None else ()
        where = f" in {self.path}" if self.path else ""
        if len(shape) != 3:
            raise ConfigError(f"{NAME}: needs images shaped (C, H, W); got data_shape {shape or data_shape}. For "
                              "other data use autoencoder=identity.")
        c, h, w = shape
        cin, f = int(self.vae.config.in_channels), self.factor
        if c != cin:
            raise ConfigError(f"{NAME}: the {self.class_name}{where} encodes {cin}-channel images, but the data have "
                              f"{c} channels (shape {shape}); pick a VAE made for such data or another dataset.")
        if h % f or w % f:
            raise ConfigError(
                f"{NAME}: the images are {h}×{w}, but the {self.class_name}{where} downsamples by {f}, so height "
                f"and width must be multiples of {f}; resize the data to {h // f * f or f}×{w // f * f or f} or "
                f"{-(-h // f) * f}×{-(-w // f) * f}."
            )
        return shape


def _check_class(name: Any, what: str) -> None:
    if name not in CLASSES:
        raise ConfigError(f"{NAME}: {what} is {name!r}, but it reads only {' and '.join(CLASSES)} (diffusers' VAEs).")


def _load_folder(diffusers: Any, path: Path, subfolder: str | None) -> nn.Module:
    """The VAE of a model folder or of a pipeline folder's ``vae/``, loaded offline from safetensors."""
    if not path.is_dir():
        raise ConfigError(f"{NAME}: autoencoder.path={path} is not a folder; {NEEDS_PATH}.")
    detect = subfolder is None
    if subfolder is None:
        subfolder = "" if (path / "config.json").is_file() else "vae"
    folder = path / subfolder if subfolder else path
    config_file = folder / "config.json"
    if not config_file.is_file():
        looked = f"{path / 'config.json'} or {config_file}" if detect else str(config_file)
        raise ConfigError(
            f"{NAME}: found no {looked}; autoencoder.path must be a diffusers model folder (save_pretrained output) "
            "or a pipeline folder with a vae/ subfolder (set autoencoder.subfolder if it is named otherwise)."
        )
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {config_file} ({exc}); the file is damaged.") from exc
    _check_class(class_name, f"the model in {folder}")
    try:
        return getattr(diffusers, class_name).from_pretrained(
            str(path), subfolder=subfolder or None, local_files_only=True, use_safetensors=True,
            torch_dtype=torch.float32, low_cpu_mem_usage=False,  # without accelerate installed it warns otherwise
        )
    except Exception as exc:  # diffusers raises OSError, ValueError, safetensors errors, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot load the {class_name} in {folder} ({reason}); it needs config.json and "
            "diffusion_pytorch_model.safetensors (save_pretrained(..., safe_serialization=True))."
        ) from exc


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config as plain JSON values (tuples become lists), ``_`` keys dropped."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))
