"""A 1-D U-Net for sequences (C, L): audio clips and other signals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unfog import register
from unfog.errors import ConfigError
from unfog_backbones.embeddings import concat_condition, sinusoidal_embedding, token_condition, vector_condition

NAME = "unet1d"


def _zero(module: nn.Module) -> nn.Module:
    """``module`` with every parameter set to zero (so a residual branch starts as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock1d(nn.Module):
    """GroupNorm→SiLU→conv, scale-shift by the embedding, GroupNorm→SiLU→dropout→conv, + skip.

    The embedding gives (scale, shift) applied as GroupNorm(h)·(1 + scale) + shift (the
    adaptive group norm of Dhariwal & Nichol 2021); the second convolution starts at zero.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, kernel_size: int, dropout: float, groups: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv1d(in_ch, out_ch, kernel_size, padding=pad)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv1d(out_ch, out_ch, kernel_size, padding=pad))
        self.skip = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock1d(nn.Module):
    """Multi-head self-attention over the positions of a sequence, residual, output zero-init."""

    def __init__(self, ch: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv1d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, n = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, n)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, n))


class CrossAttentionBlock1d(nn.Module):
    """Positions attend to conditioning tokens (Rombach et al. 2022, Sec. 3.3): queries from
    the group-normed sequence, keys and values from the tokens, residual, output zero-init."""

    def __init__(self, ch: int, context_dim: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.q = nn.Conv1d(ch, ch, 1)
        self.context_norm = nn.LayerNorm(context_dim)
        self.kv = nn.Linear(context_dim, 2 * ch)
        self.proj = _zero(nn.Conv1d(ch, ch, 1))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, n = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q = self.q(self.norm(x)).reshape(b, heads, d, n).transpose(-1, -2)  # (B, heads, L, d)
        kv = self.kv(self.context_norm(context.to(x.dtype)))  # (B, T, 2C)
        k, v = kv.reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, n))


class Downsample1d(nn.Module):
    """Halve the length with a strided convolution (DDPM's downsampling, in 1-D)."""

    def __init__(self, ch: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(ch, ch, kernel_size, stride=2, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample1d(nn.Module):
    """Double the length: nearest-neighbour ×2, then a convolution (DDPM's upsampling, in 1-D)."""

    def __init__(self, ch: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(ch, ch, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage1d(nn.Sequential):
    """A sequence of layers; residual blocks also get the time embedding, cross-attention
    blocks the conditioning tokens."""

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock1d):
                h = layer(h, emb)
            elif isinstance(layer, CrossAttentionBlock1d):
                h = layer(h, context)
            else:
                h = layer(h)
        return h


@dataclass(frozen=True)
class _BlockSpec:
    """What every residual and attention block of one 1-D U-Net shares."""

    emb_dim: int
    kernel_size: int
    dropout: float
    groups: int
    num_heads: int
    context_dim: int


@register("backbone", NAME)
class UNet1DBackbone(nn.Module):
    """1-D U-Net for sequences (C, L): DDPM's U-Net (Ho et al. 2020) with convolutions along time.

    The 1-D adaptation of the DDPM U-Net used for waveforms (as in Kong et al. 2021, DiffWave,
    and Chen et al. 2021, WaveGrad, whose networks are likewise built from dilated/strided 1-D
    convolutions with a diffusion-step embedding): a ``kernel_size`` input convolution,
    ``len(channel_mult)`` levels going down (each with ``num_res_blocks`` residual blocks, then
    a stride-2 convolution halving the length), a middle res–attention–res section, and the
    mirror image going up (``num_res_blocks + 1`` blocks per level, each concatenating a skip
    connection, then nearest-neighbour ×2 and a convolution), then GroupNorm→SiLU→convolution
    (zero-init). Residual blocks are conditioned on the embedding by scale and shift of their
    second group norm (Dhariwal & Nichol 2021). The sinusoidal embedding of 1000·t goes
    through Linear→SiLU→Linear to 4·``channels``, and the projected ``"vector"`` conditioning
    is added to it.

    ``"tokens"`` (width ``context_dim``) are attended to by a cross-attention block after
    every self-attention block, the middle one included (Rombach et al. 2022); ``"concat"``
    (``cond_channels`` channels of the same length) are stacked onto the input.

    Args:
        channels: base channel count (width of the first level).
        channel_mult: width multiplier of each level, from the full length down.
        num_res_blocks: residual blocks per level on the way down.
        attention_levels: levels (0 = full length, each next one half as long) at which
            self-attention follows each residual block; the middle always has attention.
        num_heads: attention heads.
        kernel_size: width of every convolution along time (odd).
        dropout: dropout probability inside the residual blocks.
        groups: GroupNorm groups; every level's width must be divisible by it.
    """

    data_ranks: ClassVar[tuple[int, ...]] = (2,)
    routes: ClassVar[tuple[str, ...]] = ("vector", "tokens", "concat")

    def __init__(
        self,
        data_shape: tuple[int, ...],
        cond_dim: int = 0,
        context_dim: int = 0,
        cond_channels: int = 0,
        channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_levels: tuple[int, ...] = (3,),
        num_heads: int = 4,
        kernel_size: int = 5,
        dropout: float = 0.0,
        groups: int = 8,
    ) -> None:
        super().__init__()
        data_shape, channel_mult = tuple(data_shape), tuple(channel_mult)
        attention_levels = tuple(attention_levels)
        _check_scalars(data_shape, cond_dim, context_dim, cond_channels, channels, num_res_blocks, num_heads,
                       kernel_size, groups, dropout)
        _check_levels(data_shape, channel_mult, attention_levels)
        _check_widths(channels, channel_mult, attention_levels, num_heads, groups)
        self.data_shape = data_shape
        self.cond_dim = cond_dim
        self.context_dim = context_dim
        self.cond_channels = cond_channels
        self.channels = channels
        self._spec = _BlockSpec(4 * channels, kernel_size, dropout, groups, num_heads, context_dim)
        self.time_mlp = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.SiLU(), nn.Linear(4 * channels, 4 * channels)
        )
        self.cond_proj = nn.Linear(cond_dim, 4 * channels) if cond_dim > 0 else None
        self.inp = nn.Conv1d(data_shape[0] + cond_channels, channels, kernel_size, padding=kernel_size // 2)
        widths = [channels * m for m in channel_mult]
        attends = [level in attention_levels for level in range(len(channel_mult))]
        self.down, skips = self._down_path(widths, attends, num_res_blocks)
        self.middle = Stage1d(
            self._res(widths[-1], widths[-1]), *self._attn(widths[-1]), self._res(widths[-1], widths[-1])
        )
        self.up = self._up_path(widths, attends, num_res_blocks, skips)
        self.out = nn.Sequential(
            nn.GroupNorm(groups, widths[0]),
            nn.SiLU(),
            _zero(nn.Conv1d(widths[0], data_shape[0], kernel_size, padding=kernel_size // 2)),
        )

    def _res(self, cin: int, cout: int) -> ResBlock1d:
        sp = self._spec
        return ResBlock1d(cin, cout, sp.emb_dim, sp.kernel_size, sp.dropout, sp.groups)

    def _attn(self, ch: int) -> list[nn.Module]:
        """Self-attention, then cross-attention to the tokens when there are any."""
        sp = self._spec
        blocks: list[nn.Module] = [AttentionBlock1d(ch, sp.num_heads, sp.groups)]
        if sp.context_dim > 0:
            blocks.append(CrossAttentionBlock1d(ch, sp.context_dim, sp.num_heads, sp.groups))
        return blocks

    def _down_path(
        self, widths: list[int], attends: list[bool], num_res_blocks: int
    ) -> tuple[nn.ModuleList, list[int]]:
        """Stages going down, and the channel count of every skip connection they leave."""
        stages, ch = nn.ModuleList(), self.channels
        skips = [ch]
        for level, (width, attend) in enumerate(zip(widths, attends, strict=True)):
            for _ in range(num_res_blocks):
                stages.append(Stage1d(self._res(ch, width), *(self._attn(width) if attend else [])))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:
                stages.append(Stage1d(Downsample1d(ch, self._spec.kernel_size)))
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
                    layers.append(Upsample1d(width, self._spec.kernel_size))
                stages.append(Stage1d(*layers))
        return stages

    def embed(self, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """Time embedding of ``t`` (B,) plus the projected vector conditioning, (B, 4·channels)."""
        emb = self.time_mlp(sinusoidal_embedding(t, self.channels).to(self.inp.weight.dtype))
        vec = vector_condition(cond, self.cond_dim, NAME)
        if self.cond_proj is not None and vec is not None:
            emb = emb + self.cond_proj(vec.to(emb.dtype))
        return F.silu(emb)

    def forward(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """Output shaped like ``x`` (B, C, L) for times ``t`` (B,) in [0, 1]."""
        emb = self.embed(t, cond)
        context = token_condition(cond, self.context_dim, NAME)
        extra = concat_condition(cond, x, self.cond_channels, NAME)
        h = self.inp(x if extra is None else torch.cat([x, extra.to(x.dtype)], dim=1))
        skips = [h]
        for stage in self.down:
            h = stage(h, emb, context)
            skips.append(h)
        h = self.middle(h, emb, context)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)


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
    if len(data_shape) != 2 or min(data_shape) < 1:
        raise ConfigError(
            f"{NAME}: data_shape must be a sequence shape (C, L) of positive sizes, e.g. (1, 4096) for a "
            f"mono clip; got {data_shape}. For images use the 'unet' backbone, for vectors 'mlp'."
        )
    for name, value in {"cond_dim": cond_dim, "context_dim": context_dim, "cond_channels": cond_channels}.items():
        if value < 0:
            raise ConfigError(f"{NAME}: {name} must be 0 (not used) or positive; got {value}.")
    named = {"channels": channels, "num_res_blocks": num_res_blocks, "num_heads": num_heads, "groups": groups}
    for name, value in named.items():
        if value < 1:
            raise ConfigError(f"{NAME}: {name} must be at least 1; got {value}.")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(
            f"{NAME}: kernel_size must be a positive odd number (so that 'same' padding keeps the length); "
            f"got {kernel_size}. Try 3 or 5."
        )
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{NAME}: dropout must lie in [0, 1); got {dropout}.")


def _check_levels(
    data_shape: tuple[int, ...], channel_mult: tuple[int, ...], attention_levels: tuple[int, ...]
) -> None:
    """Refuse levels that do not divide the length and attention at levels that do not exist."""
    if not channel_mult or min(channel_mult) < 1:
        raise ConfigError(
            f"{NAME}: channel_mult must be a non-empty list of positive multipliers; got {list(channel_mult)}."
        )
    factor = 2 ** (len(channel_mult) - 1)
    length = data_shape[1]
    if length % factor:
        raise ConfigError(
            f"{NAME}: the length L={length} must be divisible by 2**(len(channel_mult)-1) = {factor}, "
            f"since channel_mult {list(channel_mult)} halves it {len(channel_mult) - 1} times. "
            "Use fewer levels or another clip length."
        )
    levels = list(range(len(channel_mult)))
    never = [a for a in attention_levels if a not in levels]
    if never:
        raise ConfigError(
            f"{NAME}: attention_levels {list(attention_levels)} include {never}, but with channel_mult "
            f"{list(channel_mult)} the levels are {levels} (0 = full length L={length}, level k has "
            f"length L/2**k). Pick levels from those (or [] for attention only in the middle)."
        )


def _check_widths(
    channels: int,
    channel_mult: tuple[int, ...],
    attention_levels: tuple[int, ...],
    num_heads: int,
    groups: int,
) -> None:
    """Refuse widths that GroupNorm or the attention heads cannot split."""
    bad_groups = sorted({channels * m for m in channel_mult if (channels * m) % groups})
    if bad_groups:
        raise ConfigError(
            f"{NAME}: every level's width channels·channel_mult must be divisible by groups={groups} "
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
