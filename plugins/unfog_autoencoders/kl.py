"""The KL-regularised convolutional autoencoder of latent diffusion (Rombach et al. 2022), the
first stage that ``unfog train-autoencoder`` trains and latent models encode their data with.

Its parameter names follow one layout throughout (``encoder.down.{level}.blocks.{i}``,
``encoder.mid.attn.q``, ``decoder.up.{i}.upsample.conv``, ...) that renames one to one into
diffusers' ``AutoencoderKL`` (``unfog_diffusers.vae.kl_to_diffusers``), so a trained
autoencoder can be used by any program that reads diffusers' VAEs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unfog import register
from unfog.errors import CheckpointError, ConfigError
from unfog.protocols import Posterior
from unfog.util import sha256_of

NAME = "kl"
WEIGHTS_FILE = "autoencoder.safetensors"
RECORD_FILE = "autoencoder.json"
ARCHITECTURE: tuple[str, ...] = (
    "factor", "latent_channels", "channels", "channel_mult", "layers_per_block", "attention", "norm_groups",
)
DEFAULTS: dict[str, Any] = {  # channel_mult: default_channel_mult(factor)
    "factor": 4, "latent_channels": 4, "channels": 16, "layers_per_block": 1, "attention": True, "norm_groups": 8,
}
LOGVAR_RANGE = (-30.0, 20.0)  # LDM's clamp of the posterior's log-variance
NORM_EPS = 1e-6  # GroupNorm epsilon of LDM's first stage (and of diffusers' AutoencoderKL)
MAKE_WEIGHTS = "unfog train-autoencoder dataset=... autoencoder=kl"


def default_channel_mult(factor: int) -> list[int]:
    """Width multipliers for ``factor``: one level per halving plus the full-size one, doubling
    up to 4× as LDM's first stages do (f=4: [1, 2, 4]; f=8: [1, 2, 4, 4]; f=1: [1])."""
    return [min(2**level, 4) for level in range(_levels(factor))]


def _levels(factor: int) -> int:
    return int(math.log2(factor)) + 1


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3, twice, plus the input (through a 1×1 convolution when the
    width changes): the residual block of LDM's first stage (Rombach et al. 2022; He et al. 2016)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.shortcut(x) if self.shortcut is not None else x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions, residual: GroupNorm, then linear maps
    q, k, v and out (the attention block of LDM's first stage; Vaswani et al. 2017)."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q, self.k, self.v, self.out = (nn.Linear(ch, ch) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, positions, C)
        attended = F.scaled_dot_product_attention(self.q(tokens), self.k(tokens), self.v(tokens))
        return x + self.out(attended).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    """ResNet block, self-attention (optional), ResNet block, at the smallest size."""

    def __init__(self, ch: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.block1 = ResnetBlock(ch, ch, groups)
        self.attn = SelfAttention(ch, groups) if attention else None
        self.block2 = ResnetBlock(ch, ch, groups)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block1(x)
        if self.attn is not None:
            h = self.attn(h)
        return self.block2(h)


class Downsample(nn.Module):
    """Halves height and width: zero padding of one row and column at the end (0, 1, 0, 1),
    then a 3×3 convolution with stride 2, as in LDM's first stage."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Doubles height and width: nearest-neighbour ×2, then a 3×3 convolution."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """ResNet blocks at one size, then a :class:`Downsample` (encoder) or :class:`Upsample`
    (decoder), except at the smallest size on the way down and the full size on the way up."""

    def __init__(self, in_ch: int, out_ch: int, blocks: int, groups: int,
                 resample: Literal["down", "up"] | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(blocks))
        self.downsample = Downsample(out_ch) if resample == "down" else None
        self.upsample = Upsample(out_ch) if resample == "up" else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """conv_in, one :class:`Level` per width (downsampling after all but the last), the mid
    block, GroupNorm → SiLU → conv_out to 2·latent_channels (mean and log-variance)."""

    def __init__(self, in_ch: int, widths: list[int], blocks: int, latent_channels: int, groups: int,
                 attention: bool) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        ins = [widths[0], *widths[:-1]]
        last = len(widths) - 1
        self.down = nn.ModuleList(
            Level(cin, cout, blocks, groups, "down" if level < last else None)
            for level, (cin, cout) in enumerate(zip(ins, widths, strict=True))
        )
        self.mid = MidBlock(widths[-1], groups, attention)
        self.norm_out = _norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in from the latents, the mid block, one :class:`Level` per width from the smallest
    size up (``up[0]`` is the deepest; upsampling after all but the last), GroupNorm → SiLU →
    conv_out to the data's channels."""

    def __init__(self, out_ch: int, widths: list[int], blocks: int, latent_channels: int, groups: int,
                 attention: bool) -> None:
        super().__init__()
        widths = list(reversed(widths))
        self.conv_in = nn.Conv2d(latent_channels, widths[0], 3, padding=1)
        self.mid = MidBlock(widths[0], groups, attention)
        ins = [widths[0], *widths[:-1]]
        last = len(widths) - 1
        self.up = nn.ModuleList(
            Level(cin, cout, blocks, groups, "up" if i < last else None)
            for i, (cin, cout) in enumerate(zip(ins, widths, strict=True))
        )
        self.norm_out = _norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.up:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@register("autoencoder", NAME)
class KLAutoencoder(nn.Module):
    """The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1 and G).

    Encoder: conv_in; ``len(channel_mult)`` = log2(``factor``) + 1 levels of
    ``layers_per_block`` ResNet blocks (GroupNorm → SiLU → conv3×3, twice; a 1×1 shortcut where
    the width changes) at widths ``channels``·``channel_mult``, each but the last followed by a
    stride-2 3×3 convolution with zero padding (0, 1, 0, 1); a mid block (ResNet block,
    single-head self-attention, ResNet block); GroupNorm → SiLU → conv_out to the mean and
    log-variance of ``latent_channels`` channels; a 1×1 ``quant_conv``. The log-variance is
    clamped to [−30, 20] as in LDM, and std = exp(logvar / 2). Decoder: a 1×1
    ``post_quant_conv``, conv_in, the mid block, the levels in reverse with
    ``layers_per_block`` + 1 ResNet blocks and nearest ×2 upsampling + conv3×3 between them,
    GroupNorm → SiLU → conv_out; no output activation (the data lie in [−1, 1], the kernel
    clips samples). Training (reconstruction, perceptual and KL losses; LDM's adaptive GAN
    weight reads :meth:`last_layer`) is ``unfog train-autoencoder``'s.

    Every architecture argument left at None takes the value recorded with ``weights``, or else
    its default. The defaults are sized for 64×64 images on a laptop CPU: ``factor`` 4 (a
    16×16×4 latent), ``latent_channels`` 4, ``channels`` 16 with ``channel_mult`` [1, 2, 4]
    (widths 16, 32, 64; 0.68 M parameters; a training step on 16 images of 64×64 takes 0.8 s
    on one CPU thread, against 2.7 s at ``channels`` 32), ``layers_per_block`` 1, attention
    on, ``norm_groups`` 8. LDM's own first stages are wider and deeper: ``channels`` 128,
    ``layers_per_block`` 2, ``norm_groups`` 32, with ``channel_mult`` [1, 2, 4] and 3 latent
    channels at f=4 and [1, 2, 4, 4] and 4 channels at f=8 (Stable Diffusion's VAE). The
    default ``channel_mult`` doubles per level up to 4× (:func:`default_channel_mult`).

    ``flip_equivariant`` is false: a convolutional autoencoder commutes with a left-right flip
    only as far as training made its kernels mirror-symmetric, and the one-sided padding of
    the stride-2 downsampling puts its sampling grid half a pixel off the mirror axis (an
    untrained one changes its latent by up to 1.1 under a flip). So ``data.hflip=true`` caches
    the posterior of each mirrored image too, rather than flipping latents.

    Args:
        factor: how much smaller the latent is than the image along each side; a power of two
            (1: no downsampling). Height and width of the data must be multiples of it.
        latent_channels: channels of the latent.
        channels: width of the first level.
        channel_mult: width multiplier of each level, log2(factor) + 1 of them.
        layers_per_block: ResNet blocks per encoder level (the decoder has one more).
        attention: self-attention in the mid blocks (LDM always has it).
        norm_groups: GroupNorm groups; must divide every level's width.
        weights: a folder written by ``unfog train-autoencoder`` (``autoencoder.safetensors``
            and ``autoencoder.json``, which records the architecture and the file's SHA-256), or
            a ``.safetensors`` file (its architecture is read from an ``autoencoder.json`` beside
            it, else taken from the arguments). None: an untrained network.
    """

    lossless: ClassVar[bool] = False
    flip_equivariant: ClassVar[bool] = False

    def __init__(self, data_shape: tuple[int, ...], factor: int | None = None, latent_channels: int | None = None,
                 channels: int | None = None, channel_mult: list[int] | None = None,
                 layers_per_block: int | None = None, attention: bool | None = None, norm_groups: int | None = None,
                 weights: str | None = None) -> None:
        super().__init__()
        explicit = {"factor": factor, "latent_channels": latent_channels, "channels": channels,
                    "channel_mult": channel_mult, "layers_per_block": layers_per_block, "attention": attention,
                    "norm_groups": norm_groups}
        found = _WeightsFile.find(weights) if weights is not None else None
        arch = _resolve(explicit, found)
        self.data_shape = _check_data_shape(data_shape, arch["factor"], found)
        self.arch = arch
        widths = [arch["channels"] * m for m in arch["channel_mult"]]
        c, lc, groups = self.data_shape[0], arch["latent_channels"], arch["norm_groups"]
        self.encoder = Encoder(c, widths, arch["layers_per_block"], lc, groups, arch["attention"])
        self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1)
        self.post_quant_conv = nn.Conv2d(lc, lc, 1)
        self.decoder = Decoder(c, widths, arch["layers_per_block"] + 1, lc, groups, arch["attention"])
        if found is not None:
            found.load_into(self)
        self.untrained = found is None  # random weights: `unfog train` says so (a checkpoint loads its own after)

    def encode(self, x: Tensor) -> Posterior:
        """The diagonal Gaussian posterior over latents (B, latent_channels, H/f, W/f)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        logvar = logvar.clamp(*LOGVAR_RANGE)
        return Posterior(mean, torch.exp(0.5 * logvar))

    def decode(self, z: Tensor) -> Tensor:
        """Images (B, C, H, W) from latents (B, latent_channels, H/f, W/f)."""
        return self.decoder(self.post_quant_conv(z))

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        """(latent_channels, H / factor, W / factor) for images of ``data_shape`` (C, H, W)."""
        f = self.arch["factor"]
        return (self.arch["latent_channels"], int(data_shape[-2]) // f, int(data_shape[-1]) // f)

    def last_layer(self) -> Tensor:
        """The weight of the decoder's output convolution, by which LDM's adaptive GAN weight
        divides the gradient norms (Esser et al. 2021, Eq. 7)."""
        return self.decoder.conv_out.weight

    def settings(self) -> dict[str, Any]:
        """The resolved architecture: ``KLAutoencoder(data_shape, **settings())`` rebuilds the
        same network without reading any file."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.arch.items()}


class _WeightsFile:
    """A safetensors file of a kl autoencoder and what its ``autoencoder.json`` records."""

    def __init__(self, file: Path, where: Path, record: dict[str, Any] | None) -> None:
        self.file, self.where, self.record = file, where, record

    @classmethod
    def find(cls, weights: str) -> _WeightsFile:
        """Locate the file and read its record; ConfigError when there is nothing to read."""
        path = Path(weights).expanduser()
        if not path.exists():
            raise ConfigError(
                f"{NAME}: autoencoder.weights={weights} does not exist. Train one with `{MAKE_WEIGHTS}` (it "
                f"writes a folder with {WEIGHTS_FILE} and {RECORD_FILE}) and pass that folder, or leave "
                "autoencoder.weights unset for an untrained network."
            )
        if path.is_dir():
            file = path / WEIGHTS_FILE
            if not file.is_file():
                raise ConfigError(
                    f"{NAME}: {path} has no {WEIGHTS_FILE}, so it is not a folder written by `unfog "
                    f"train-autoencoder`. Pass such a folder (make one with `{MAKE_WEIGHTS}`) or a .safetensors file."
                )
        elif path.suffix == ".safetensors":
            file = path
        else:
            raise ConfigError(
                f"{NAME}: autoencoder.weights must be a folder written by `unfog train-autoencoder` or a "
                f".safetensors file; got {path}. (Pickled checkpoints are not read: they can run code.)"
            )
        record_file = file.parent / RECORD_FILE
        record = _read_record(record_file) if record_file.is_file() else None
        return cls(file, path, record)

    @property
    def architecture(self) -> dict[str, Any] | None:
        """The recorded architecture arguments, or None when there is no record."""
        if self.record is None:
            return None
        config = dict(self.record.get("config") or {})
        name = config.pop("_name_", NAME)
        if name != NAME:
            raise ConfigError(
                f"{NAME}: the weights in {self.where} are of a {name!r} autoencoder, not {NAME!r}; use "
                f"autoencoder={name} autoencoder.weights={self.where}."
            )
        unknown = sorted(set(config) - set(ARCHITECTURE))
        if unknown:
            raise CheckpointError(
                f"{self.file.parent / RECORD_FILE} records settings this version of the {NAME} autoencoder does not "
                f"know ({', '.join(unknown)}); it was written by a newer unfog: upgrade unfog."
            )
        return config

    def load_into(self, module: nn.Module) -> None:
        """Check the recorded SHA-256, read the tensors and load them (strictly) into ``module``."""
        from safetensors.torch import load_file

        record = self.record or {}
        described = record.get("weights", WEIGHTS_FILE)  # the file whose hash the record holds
        expected = record.get("sha256") if self.file.name == described else None
        if expected:
            actual = sha256_of(self.file)
            if actual != expected:
                raise CheckpointError(
                    f"{self.file} has sha256 {actual[:12]}…, but {RECORD_FILE} records {str(expected)[:12]}…: the "
                    "file was changed or damaged; restore it or train the autoencoder again."
                )
        try:
            state = load_file(str(self.file), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for damaged files
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"cannot read {self.file} as safetensors ({reason}); the file is damaged.") from exc
        problem = _misfit(module, state)
        if problem:
            settings = ", ".join(f"{k}={_show(v)}" for k, v in module.settings().items())  # type: ignore[operator]
            hint = ("" if self.architecture else
                    "; with no " + RECORD_FILE + " beside it, pass the architecture it was trained with")
            raise CheckpointError(
                f"the weights in {self.file} do not fit a {NAME} autoencoder with {settings} "
                f"for {module.data_shape[0]}-channel data: {problem}{hint}."  # type: ignore[index]
            )
        module.load_state_dict(state)


def _read_record(file: Path) -> dict[str, Any]:
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {file} ({type(exc).__name__}: {exc}); the file is damaged.") from exc
    if not isinstance(record, dict) or not isinstance(record.get("config", {}), dict):
        raise CheckpointError(f"{file} is not an autoencoder record (a JSON object with a \"config\" object).")
    return record


def _misfit(module: nn.Module, state: Mapping[str, Tensor]) -> str:
    """What keeps ``state`` from loading strictly into ``module``, in one line ("" if nothing)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape (e.g. {shapes[0]})")
    return "; ".join(parts)


def _resolve(explicit: Mapping[str, Any], found: _WeightsFile | None) -> dict[str, Any]:
    """Every architecture argument: given, else recorded with the weights, else the default;
    a given one that differs from the recorded one is an error."""
    recorded = found.architecture if found is not None else None
    arch: dict[str, Any] = {}
    for key in ARCHITECTURE:
        value = _coerce(key, explicit[key])
        if recorded is not None and key in recorded:
            stored = _coerce(key, recorded[key])
            if value is not None and value != stored:
                raise ConfigError(
                    f"autoencoder.{key}={_show(value)}, but the weights in {found.where} are of a {NAME} "
                    f"autoencoder with {key}={_show(stored)}; drop autoencoder.{key} (it is read from the weights) "
                    "or train weights with that value."
                )
            value = stored
        arch[key] = value
    for key, default in DEFAULTS.items():
        if arch[key] is None:
            arch[key] = default
    _check_factor(arch["factor"])
    if arch["channel_mult"] is None:
        arch["channel_mult"] = default_channel_mult(arch["factor"])
    _check_architecture(arch)
    return arch


def _coerce(key: str, value: Any) -> Any:
    if value is None:
        return None
    if key == "channel_mult":
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{NAME}: channel_mult must be a list of positive integers, e.g. [1,2,4]; got {value!r}.")
        return [int(m) for m in value]
    return bool(value) if key == "attention" else int(value)


def _show(value: Any) -> str:
    """A value as it is written on the command line: ``[1,2,4]``, ``true``, ``8``."""
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_factor(factor: int) -> None:
    if factor < 1 or factor & (factor - 1):
        raise ConfigError(
            f"{NAME}: factor must be a power of two (1, 2, 4, 8, ...: the encoder halves height and width "
            f"log2(factor) times); got {factor}."
        )


def _check_architecture(arch: Mapping[str, Any]) -> None:
    levels, mult = _levels(arch["factor"]), arch["channel_mult"]
    if len(mult) != levels:
        raise ConfigError(
            f"{NAME}: channel_mult needs log2(factor) + 1 = {levels} entries for factor={arch['factor']} (one per "
            f"level; each but the last halves the size); got {_show(mult)}. Drop it for the default "
            f"{_show(default_channel_mult(arch['factor']))}."
        )
    for key in ("latent_channels", "channels", "layers_per_block", "norm_groups"):
        if arch[key] < 1:
            raise ConfigError(f"{NAME}: {key} must be at least 1; got {arch[key]}.")
    if min(mult) < 1:
        raise ConfigError(f"{NAME}: every channel_mult entry must be at least 1; got {_show(mult)}.")
    widths = [arch["channels"] * m for m in mult]
    bad = [w for w in widths if w % arch["norm_groups"]]
    if bad:
        raise ConfigError(
            f"{NAME}: norm_groups={arch['norm_groups']} must divide every level's width "
            f"(channels × channel_mult = {widths}); it does not divide {bad[0]}. Pick a divisor of "
            f"{math.gcd(*widths)} for norm_groups, or change channels."
        )


def _check_data_shape(data_shape: Sequence[int] | None, factor: int, found: _WeightsFile | None) -> tuple[int, ...]:
    shape = tuple(int(s) for s in data_shape) if data_shape is not None else ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(
            f"{NAME}: needs images shaped (C, H, W); got data_shape {shape or data_shape}. For points, sound or "
            "other data use autoencoder=identity (no first stage)."
        )
    c, h, w = shape
    if h % factor or w % factor:
        sizes = [f"{max(h // factor, 1) * factor}×{max(w // factor, 1) * factor}",
                 f"{-(-h // factor) * factor}×{-(-w // factor) * factor}"]
        raise ConfigError(
            f"{NAME}: the images are {h}×{w}, but height and width must be multiples of factor={factor} (the "
            f"encoder halves them {_levels(factor) - 1} times). Resize the data to {' or '.join(dict.fromkeys(sizes))} "
            "(e.g. the dataset's size option), or pick another autoencoder.factor."
        )
    recorded = (found.record or {}).get("data_shape") if found is not None else None
    if recorded and int(recorded[0]) != c:
        raise ConfigError(
            f"{NAME}: the weights in {found.where} encode {int(recorded[0])}-channel images "  # type: ignore[union-attr]
            f"(trained on data of shape {tuple(recorded)}), but the data have {c} channels; use weights trained on "
            "data like these."
        )
    return shape
