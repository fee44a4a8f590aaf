"""One U-Net for every dimension: sound (C, L), images (C, H, W) and video (C, T, H, W)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unfog import register
from unfog.config import NAME_KEY, plain
from unfog.errors import ConfigError
from unfog_backbones.embeddings import concat_condition, sinusoidal_embedding, token_condition, vector_condition

NAME = "unet"
Resample = Literal["none", "up", "down"]
_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}

# The defaults of the former `unet1d` backbone (merged into this one), for its old configs.
_UNET1D_DEFAULTS: dict[str, Any] = {
    "channels": 32, "channel_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attention_levels": [3], "num_heads": 4,
    "kernel_size": 5, "dropout": 0.0, "groups": 8,
}
_UNET2D_CHANNEL_MULT = [1, 2, 2, 2]  # the default channel_mult of the former image-only `unet`


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1-, 2- or 3-D convolution for ``dims`` spatial axes (guided-diffusion's ``conv_nd``,
    Dhariwal & Nichol 2021)."""
    return _CONV[dims](*args, **kwargs)


def _zero(module: nn.Module) -> nn.Module:
    """``module`` with every parameter set to zero (so a residual branch starts as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _resample(x: Tensor, mode: Resample) -> Tensor:
    """Parameter-free resampling of every spatial axis, used inside ADM's up/down residual blocks."""
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if mode == "down":
        return _AVG_POOL[x.ndim - 2](x, kernel_size=2, stride=2)
    return x


def _spatial(v: Tensor, dims: int) -> Tensor:
    """``v`` (B, C) as (B, C, 1, ..., 1), to broadcast over ``dims`` spatial axes."""
    return v.reshape(*v.shape, *([1] * dims))


class ResBlock(nn.Module):
    """GroupNorm→SiLU→conv, + time embedding, GroupNorm→SiLU→dropout→conv, + skip (Ho et al. 2020).

    With ``scale_shift`` the embedding gives (scale, shift) applied as
    GroupNorm(h)·(1 + scale) + shift (ADM's adaptive group norm, Dhariwal & Nichol 2021);
    ``resample`` moves up/down sampling inside the block (ADM's ``resblock_updown``).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        dropout: float,
        groups: int,
        scale_shift: bool = False,
        resample: Resample = "none",
        dims: int = 2,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.resample = resample
        pad = kernel_size // 2
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = conv_nd(dims, in_ch, out_ch, kernel_size, padding=pad)
        self.emb = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero(conv_nd(dims, out_ch, out_ch, kernel_size, padding=pad))
        self.skip = conv_nd(dims, in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))
        h = self.conv1(_resample(h, self.resample))
        e = _spatial(self.emb(emb), x.ndim - 2)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(_resample(x, self.resample)) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions of a feature map (Ho et al. 2020),
    residual, output zero-init."""

    def __init__(self, ch: int, num_heads: int, groups: int, dims: int = 2) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = conv_nd(dims, ch, 3 * ch, 1)
        self.proj = _zero(conv_nd(dims, ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, -1)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, heads, positions, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(x.shape))


class CrossAttentionBlock(nn.Module):
    """Positions attend to conditioning tokens: queries from the group-normed feature map, keys
    and values from the tokens (Rombach et al. 2022, Sec. 3.3), residual, output zero-init so
    a new block starts as the identity."""

    def __init__(self, ch: int, context_dim: int, num_heads: int, groups: int, dims: int = 2) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.q = conv_nd(dims, ch, ch, 1)
        self.context_norm = nn.LayerNorm(context_dim)
        self.kv = nn.Linear(context_dim, 2 * ch)
        self.proj = _zero(conv_nd(dims, ch, ch, 1))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c = x.shape[:2]
        heads, d = self.num_heads, c // self.num_heads
        q = self.q(self.norm(x)).reshape(b, heads, d, -1).transpose(-1, -2)  # (B, heads, positions, d)
        kv = self.kv(self.context_norm(context.to(x.dtype)))  # (B, L, 2C)
        k, v = kv.reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(x.shape))


class Downsample(nn.Module):
    """DDPM's downsampling (Ho et al. 2020): a convolution with stride 2 along every axis."""

    def __init__(self, ch: int, dims: int = 2, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = conv_nd(dims, ch, ch, kernel_size, stride=2, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """DDPM's upsampling (Ho et al. 2020): nearest-neighbour ×2 along every axis, then a convolution."""

    def __init__(self, ch: int, dims: int = 2, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = conv_nd(dims, ch, ch, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(_resample(x, "up"))


class Stage(nn.Sequential):
    """A sequence of layers; residual blocks also get the time embedding, cross-attention
    blocks the conditioning tokens."""

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, CrossAttentionBlock):
                h = layer(h, context)
            else:
                h = layer(h)
        return h


@dataclass(frozen=True)
class _BlockSpec:
    """What every residual and attention block of one U-Net shares."""

    emb_dim: int
    dropout: float
    groups: int
    scale_shift: bool
    resblock_updown: bool
    num_heads: int
    context_dim: int
    dims: int
    kernel_size: int


@register("backbone", NAME, replaces=("unet1d",))
class UNetBackbone(nn.Module):
    """U-Net of DDPM (Ho et al. 2020) with ADM's options (Dhariwal & Nichol 2021), for 1-D, 2-D and 3-D data.

    One network for sound (C, L), images (C, H, W) and video (C, T, H, W): as guided-diffusion's
    ``conv_nd``, the convolutions are 1-, 2- or 3-D by the number of spatial axes, and every
    spatial axis is halved from one level to the next. A ``kernel_size`` input convolution,
    ``len(channel_mult)`` levels going down (each with ``num_res_blocks`` residual blocks,
    then a downsampling), a middle res–attention–res section, and the mirror image going up
    (``num_res_blocks + 1`` blocks per level, each concatenating a skip connection), then
    GroupNorm→SiLU→convolution (zero-init). The sinusoidal embedding of 1000·t goes through
    Linear→SiLU→Linear to 4·``channels``, and the projected ``"vector"`` conditioning is added
    to it. The defaults are the paper's CIFAR-10 network (35.7 M parameters). On 1-D data this
    is the 1-D U-Net used for waveforms (as in Kong et al. 2021, DiffWave, and Chen et al.
    2021, WaveGrad); ``use_scale_shift_norm=True, kernel_size=5`` is the former ``unet1d``.

    Any size works: the input is padded at the end of every spatial axis (replicating the
    last value) to a multiple of 2**(len(channel_mult) − 1), so that every level halves it
    exactly, and the output is cropped back; a 40×30 image with 4 levels runs at 40×32.
    The padding is seen by convolutions, group norms and attention, so it is best kept small.

    The other two conditioning routes are wired from the model's conditioners: ``"tokens"``
    (width ``context_dim``) are attended to by a cross-attention block after every
    self-attention block, the middle one included (Rombach et al. 2022); ``"concat"``
    (``cond_channels`` channels at the data's size) are stacked onto the input.

    Args:
        channels: base channel count (width of the first level).
        channel_mult: width multiplier of each level, from the full size down.
        num_res_blocks: residual blocks per level on the way down.
        attention_levels: levels (0 = full size, each next one half as large along every
            axis) at which self-attention follows each residual block; the middle always has it.
        num_heads: attention heads.
        dropout: dropout probability inside the residual blocks.
        use_scale_shift_norm: condition residual blocks on the embedding by a scale and shift
            of the group norm (ADM) instead of by adding it.
        resblock_updown: resample with residual blocks (ADM) instead of a strided convolution
            down and nearest-neighbour + convolution up (DDPM).
        groups: GroupNorm groups; every level's width must be divisible by it.
        coord_channels: stack the position along every spatial axis (in [−1, 1]) onto the
            input (CoordConv, Liu et al. 2018): convolutions and attention without positional
            embeddings cannot tell where a pixel is beyond their receptive field, which a
            prompt such as "in the top left" needs.
        kernel_size: width of every convolution along each axis (odd; 1×1 projections aside).
    """

    data_ranks: ClassVar[tuple[int, ...]] = (2, 3, 4)
    routes: ClassVar[tuple[str, ...]] = ("vector", "tokens", "concat")

    def __init__(
        self,
        data_shape: tuple[int, ...],
        cond_dim: int = 0,
        context_dim: int = 0,
        cond_channels: int = 0,
        channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: tuple[int, ...] = (1,),
        num_heads: int = 1,
        dropout: float = 0.1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        groups: int = 32,
        coord_channels: bool = False,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        data_shape, channel_mult = tuple(data_shape), tuple(channel_mult)
        attention_levels = tuple(attention_levels)
        _check_scalars(data_shape, cond_dim, context_dim, cond_channels, channels, num_res_blocks, num_heads,
                       kernel_size, groups, dropout)
        _check_levels(channel_mult, attention_levels)
        _check_widths(channels, channel_mult, attention_levels, num_heads, groups)
        self.data_shape = data_shape
        self.cond_dim = cond_dim
        self.context_dim = context_dim
        self.cond_channels = cond_channels
        self.channels = channels
        self.coord_channels = coord_channels
        self.multiple = 2 ** (len(channel_mult) - 1)
        dims = len(data_shape) - 1
        self._spec = _BlockSpec(4 * channels, dropout, groups, use_scale_shift_norm, resblock_updown, num_heads,
                                context_dim, dims, kernel_size)
        self.time_mlp = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.SiLU(), nn.Linear(4 * channels, 4 * channels)
        )
        self.cond_proj = nn.Linear(cond_dim, 4 * channels) if cond_dim > 0 else None
        in_ch = data_shape[0] + cond_channels + (dims if coord_channels else 0)
        self.inp = conv_nd(dims, in_ch, channels, kernel_size, padding=kernel_size // 2)
        widths = [channels * m for m in channel_mult]
        attends = [level in attention_levels for level in range(len(channel_mult))]
        self.down, skips = self._down_path(widths, attends, num_res_blocks)
        self.middle = Stage(
            self._res(widths[-1], widths[-1]), *self._attn(widths[-1]), self._res(widths[-1], widths[-1])
        )
        self.up = self._up_path(widths, attends, num_res_blocks, skips)
        self.out = nn.Sequential(
            nn.GroupNorm(groups, widths[0]),
            nn.SiLU(),
            _zero(conv_nd(dims, widths[0], data_shape[0], kernel_size, padding=kernel_size // 2)),
        )

    @classmethod
    def upgrade_config(cls, node: Mapping[str, Any], wiring: Mapping[str, Any]) -> dict[str, Any]:
        """A config node of the former ``unet`` (``attention_resolutions`` in pixels) or
        ``unet1d`` rewritten for this class; a current node comes back unchanged.

        ``wiring["data_shape"]`` turns the old pixel sides (along the height) into levels.
        """
        node = dict(plain(node))
        if node.pop(NAME_KEY, NAME) == "unet1d":  # it always used the scale-shift norm
            return {NAME_KEY: NAME, **_UNET1D_DEFAULTS, **node, "use_scale_shift_norm": True}
        if "attention_resolutions" not in node:
            return {NAME_KEY: NAME, **node}
        if "attention_levels" in node:
            raise ConfigError(
                f"{NAME}: the config sets both attention_resolutions (old, in pixels) and attention_levels; "
                "keep only attention_levels."
            )
        mult = node.get("channel_mult", _UNET2D_CHANNEL_MULT)
        levels = _levels_of(list(node["attention_resolutions"]), len(mult), wiring.get("data_shape"))
        renamed = {("attention_levels" if k == "attention_resolutions" else k): v for k, v in node.items()}
        return {NAME_KEY: NAME, **renamed, "attention_levels": levels}

    def _res(self, cin: int, cout: int, resample: Resample = "none") -> ResBlock:
        sp = self._spec
        return ResBlock(cin, cout, sp.emb_dim, sp.dropout, sp.groups, sp.scale_shift, resample, sp.dims,
                        sp.kernel_size)

    def _attn(self, ch: int) -> list[nn.Module]:
        """Self-attention, then cross-attention to the tokens when there are any."""
        sp = self._spec
        blocks: list[nn.Module] = [AttentionBlock(ch, sp.num_heads, sp.groups, sp.dims)]
        if sp.context_dim > 0:
            blocks.append(CrossAttentionBlock(ch, sp.context_dim, sp.num_heads, sp.groups, sp.dims))
        return blocks

    def _resample(self, ch: int, mode: Resample) -> nn.Module:
        sp = self._spec
        if sp.resblock_updown:
            return self._res(ch, ch, mode)
        cls = Downsample if mode == "down" else Upsample
        return cls(ch, sp.dims, sp.kernel_size)

    def _down_path(
        self, widths: list[int], attends: list[bool], num_res_blocks: int
    ) -> tuple[nn.ModuleList, list[int]]:
        """Stages going down, and the channel count of every skip connection they leave."""
        stages, ch = nn.ModuleList(), self.channels
        skips = [ch]
        for level, (width, attend) in enumerate(zip(widths, attends, strict=True)):
            for _ in range(num_res_blocks):
                stages.append(Stage(self._res(ch, width), *(self._attn(width) if attend else [])))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:
                stages.append(Stage(self._resample(ch, "down")))
                skips.append(ch)
        return stages, skips

    def _up_path(
        self, widths: list[int], attends: list[bool], num_res_blocks: int, skips: list[int]
    ) -> nn.ModuleList:
        """Stages going up, each consuming one skip connection (by concatenation)."""
        stages, ch = nn.ModuleList(), widths[-1]
        for level in reversed(range(len(widths))):
            width = widths[level]
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [self._res(ch + skips.pop(), width)]
                ch = width
                if attends[level]:
                    layers.extend(self._attn(width))
                if level > 0 and i == num_res_blocks:
                    layers.append(self._resample(width, "up"))
                stages.append(Stage(*layers))
        return stages

    def embed(self, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """Time embedding of ``t`` (B,) plus the projected vector conditioning, (B, 4·channels)."""
        emb = self.time_mlp(sinusoidal_embedding(t, self.channels).to(self.inp.weight.dtype))
        vec = vector_condition(cond, self.cond_dim, NAME)
        if self.cond_proj is not None and vec is not None:
            emb = emb + self.cond_proj(vec.to(emb.dtype))
        return F.silu(emb)

    def forward(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """Output shaped like ``x`` (B, C, *spatial) for times ``t`` (B,) in [0, 1]."""
        emb = self.embed(t, cond)
        context = token_condition(cond, self.context_dim, NAME)
        extra = concat_condition(cond, x, self.cond_channels, NAME)
        parts = [x] + ([extra.to(x.dtype)] if extra is not None else []) + ([_coords(x)] if self.coord_channels else [])
        h = self.inp(_pad_end(torch.cat(parts, dim=1) if len(parts) > 1 else x, self.multiple))
        skips = [h]
        for stage in self.down:
            h = stage(h, emb, context)
            skips.append(h)
        h = self.middle(h, emb, context)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)[(slice(None), slice(None), *(slice(0, n) for n in x.shape[2:]))]


def _pad_end(x: Tensor, multiple: int) -> Tensor:
    """``x`` padded at the end of every spatial axis, replicating its last value, to a multiple of ``multiple``."""
    extra = [-n % multiple for n in x.shape[2:]]
    if not any(extra):
        return x
    return F.pad(x, [p for e in reversed(extra) for p in (0, e)], mode="replicate")  # F.pad lists the last axis first


def _coords(x: Tensor) -> Tensor:
    """The positions (B, D, *spatial) along each of the D spatial axes (for images y, then x), each from −1 to 1."""
    axes = [torch.linspace(-1.0, 1.0, n, device=x.device, dtype=x.dtype) for n in x.shape[2:]]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return grid.expand(x.shape[0], *grid.shape)


def _levels_of(resolutions: list[int], num_levels: int, data_shape: Any) -> list[int]:
    """The levels at which the former ``unet`` attended, from its sides in pixels along the height."""
    if not resolutions:
        return []
    if data_shape is None or len(data_shape) < 2:
        raise ConfigError(
            f"{NAME}: converting attention_resolutions {resolutions} (pixels) to attention_levels needs the data "
            f"shape (C, H, W); got {data_shape}. Set attention_levels instead (0 = full size, 1 = half, ...)."
        )
    sides = [int(data_shape[1]) // 2**level for level in range(num_levels)]
    never = [r for r in resolutions if r not in sides]
    if never:
        raise ConfigError(
            f"{NAME}: attention_resolutions {resolutions} include {never}, which the feature maps never reach; "
            f"with data_shape {tuple(data_shape)} and {num_levels} levels the sides are {sides}. "
            "Set attention_levels instead (0 = full size, 1 = half, ...)."
        )
    return [level for level, side in enumerate(sides) if side in resolutions]


def _check_scalars(
    data_shape: tuple[int, ...],
    cond_dim: int,
    context_dim: int,
    cond_channels: int,
    channels: int,
    num_res_blocks: int,
    num_heads: int,
    kernel_size: int,
    groups: int,
    dropout: float,
) -> None:
    """Refuse a wrong data rank and out-of-range sizes, saying what to change."""
    if len(data_shape) not in UNetBackbone.data_ranks or min(data_shape) < 1:
        raise ConfigError(
            f"{NAME}: data_shape must be (C, L) for sequences such as sound, (C, H, W) for images or "
            f"(C, T, H, W) for video, of positive sizes; got {data_shape}. For vectors or 2-D points use "
            "the 'mlp' backbone."
        )
    for name, value in {"cond_dim": cond_dim, "context_dim": context_dim, "cond_channels": cond_channels}.items():
        if value < 0:
            raise ConfigError(f"{NAME}: {name} must be 0 (not used) or positive; got {value}.")
    named = {"channels": channels, "num_res_blocks": num_res_blocks, "num_heads": num_heads, "groups": groups}
    for name, value in named.items():
        if value < 1:
            raise ConfigError(f"{NAME}: {name} must be at least 1; got {value}. Set {name} to 1 or more.")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(
            f"{NAME}: kernel_size must be a positive odd number (so that 'same' padding keeps the size); "
            f"got {kernel_size}. Try 3 or 5."
        )
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{NAME}: dropout must lie in [0, 1); got {dropout}. 0.0 turns it off.")


def _check_levels(channel_mult: tuple[int, ...], attention_levels: tuple[int, ...]) -> None:
    """Refuse an empty or non-positive channel_mult and attention at levels that do not exist."""
    if not channel_mult or min(channel_mult) < 1:
        raise ConfigError(
            f"{NAME}: channel_mult must be a non-empty list of positive multipliers; got {list(channel_mult)}. "
            "Give one multiplier per level, e.g. [1, 2, 2, 2]."
        )
    levels = list(range(len(channel_mult)))
    never = [a for a in attention_levels if a not in levels]
    if never:
        raise ConfigError(
            f"{NAME}: attention_levels {list(attention_levels)} include {never}, but with channel_mult "
            f"{list(channel_mult)} the levels are {levels} (0 = full size, level k is halved k times along "
            "every axis). Pick levels from those (or [] for attention only in the middle)."
        )


def _check_widths(
    channels: int,
    channel_mult: tuple[int, ...],
    attention_levels: tuple[int, ...],
    num_heads: int,
    groups: int,
) -> None:
    """Refuse widths that GroupNorm or the attention heads cannot split."""
    bad_groups = sorted({w for w in (channels, *(channels * m for m in channel_mult)) if w % groups})
    if bad_groups:
        raise ConfigError(
            f"{NAME}: channels and every level's width channels·channel_mult must be divisible by groups={groups} "
            f"(GroupNorm splits the channels into that many groups); these are not: {bad_groups}. "
            "Change channels, channel_mult or groups."
        )
    last = len(channel_mult) - 1
    with_attn = sorted({channels * m for lvl, m in enumerate(channel_mult) if lvl in attention_levels or lvl == last})
    bad = [c for c in with_attn if c % num_heads]
    if bad:
        raise ConfigError(
            f"{NAME}: num_heads={num_heads} must divide the channel count of every attention layer; "
            f"these have {bad} channels (the middle block always has attention). "
            "Change num_heads or channels."
        )
