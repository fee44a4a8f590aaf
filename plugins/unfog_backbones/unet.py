"""The DDPM / ADM U-Net for images."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unfog import register
from unfog.errors import ConfigError
from unfog_backbones.embeddings import concat_condition, sinusoidal_embedding, token_condition, vector_condition

Resample = Literal["none", "up", "down"]


def _zero(module: nn.Module) -> nn.Module:
    """``module`` with every parameter set to zero (so a residual branch starts as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _resample(x: Tensor, mode: Resample) -> Tensor:
    """Parameter-free resampling used inside ADM's up/down residual blocks."""
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    return x


class ResBlock(nn.Module):
    """GroupNorm→SiLU→conv3x3, + time embedding, GroupNorm→SiLU→dropout→conv3x3, + skip.

    With ``scale_shift`` the embedding gives (scale, shift) applied as
    GroupNorm(h)·(1 + scale) + shift (ADM's adaptive group norm); ``resample`` moves
    up/down sampling inside the block (ADM's ``resblock_updown``).
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
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.resample = resample
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))
        h = self.conv1(_resample(h, self.resample))
        e = self.emb(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(_resample(x, self.resample)) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual, output zero-init."""

    def __init__(self, ch: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, hgt * wid)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, heads, HW, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, hgt, wid))


class CrossAttentionBlock(nn.Module):
    """Pixels attend to conditioning tokens: queries from the group-normed feature map, keys
    and values from the tokens (Rombach et al. 2022, Sec. 3.3), residual, output zero-init so
    a new block starts as the identity."""

    def __init__(self, ch: int, context_dim: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.context_norm = nn.LayerNorm(context_dim)
        self.kv = nn.Linear(context_dim, 2 * ch)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q = self.q(self.norm(x)).reshape(b, heads, d, hgt * wid).transpose(-1, -2)  # (B, heads, HW, d)
        kv = self.kv(self.context_norm(context.to(x.dtype)))  # (B, L, 2C)
        k, v = kv.reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, hgt, wid))


class Downsample(nn.Module):
    """DDPM's downsampling: a 3x3 convolution with stride 2."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """DDPM's upsampling: nearest-neighbour ×2, then a 3x3 convolution."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

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


@register("backbone", "unet")
class UNetBackbone(nn.Module):
    """U-Net of DDPM (Ho et al. 2020) with ADM's options (Dhariwal & Nichol 2021), for images.

    A 3x3 input convolution, ``len(channel_mult)`` resolution levels going down (each with
    ``num_res_blocks`` residual blocks, then a downsampling), a middle res–attention–res
    section, and the mirror image going up (``num_res_blocks + 1`` blocks per level, each
    concatenating a skip connection), then GroupNorm→SiLU→3x3 convolution (zero-init). The
    sinusoidal embedding of 1000·t goes through Linear→SiLU→Linear to 4·``channels``, and the
    projected ``"vector"`` conditioning is added to it. The defaults are the paper's CIFAR-10
    network (35.7 M parameters).

    The other two conditioning routes are wired from the model's conditioners: ``"tokens"``
    (width ``context_dim``) are attended to by a cross-attention block after every
    self-attention block, the middle one included (Rombach et al. 2022); ``"concat"``
    (``cond_channels`` channels at the image's size) are stacked onto the input.

    Args:
        channels: base channel count (width of the first level).
        channel_mult: width multiplier of each resolution level, from the input resolution down.
        num_res_blocks: residual blocks per level on the way down.
        attention_resolutions: feature-map sides (in pixels; the height for non-square input)
            at which self-attention follows each residual block.
        num_heads: attention heads.
        dropout: dropout probability inside the residual blocks.
        use_scale_shift_norm: condition residual blocks on the embedding by a scale and shift
            of the group norm (ADM) instead of by adding it.
        resblock_updown: resample with residual blocks (ADM) instead of a strided convolution
            down and nearest-neighbour + convolution up (DDPM).
        coord_channels: stack the pixel coordinates (y, x in [−1, 1]) onto the input
            (CoordConv, Liu et al. 2018): convolutions and attention without positional
            embeddings cannot tell where a pixel is beyond their receptive field, which a
            prompt such as "in the top left" needs.
        groups: GroupNorm groups; every level's width must be divisible by it.
    """

    data_ranks: ClassVar[tuple[int, ...]] = (3,)
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
        attention_resolutions: tuple[int, ...] = (16,),
        num_heads: int = 1,
        dropout: float = 0.1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        groups: int = 32,
        coord_channels: bool = False,
    ) -> None:
        super().__init__()
        data_shape, channel_mult = tuple(data_shape), tuple(channel_mult)
        attention_resolutions = tuple(attention_resolutions)
        _check_scalars(data_shape, cond_dim, channels, num_res_blocks, num_heads, groups, dropout)
        _check_sizes(data_shape, channel_mult, attention_resolutions)
        _check_widths(channels, channel_mult, attention_resolutions, data_shape[1], num_heads, groups)
        self.data_shape = data_shape
        self.cond_dim = cond_dim
        self.context_dim = context_dim
        self.cond_channels = cond_channels
        self.channels = channels
        self._spec = _BlockSpec(
            4 * channels, dropout, groups, use_scale_shift_norm, resblock_updown, num_heads, context_dim
        )
        self.time_mlp = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.SiLU(), nn.Linear(4 * channels, 4 * channels)
        )
        self.cond_proj = nn.Linear(cond_dim, 4 * channels) if cond_dim > 0 else None
        self.coord_channels = coord_channels
        self.inp = nn.Conv2d(data_shape[0] + cond_channels + (2 if coord_channels else 0), channels, 3, padding=1)
        widths = [channels * m for m in channel_mult]
        sides = [data_shape[1] // 2**level for level in range(len(channel_mult))]
        attends = [side in attention_resolutions for side in sides]
        self.down, skips = self._down_path(widths, attends, num_res_blocks)
        self.middle = Stage(
            self._res(widths[-1], widths[-1]), *self._attn(widths[-1]), self._res(widths[-1], widths[-1])
        )
        self.up = self._up_path(widths, attends, num_res_blocks, skips)
        self.out = nn.Sequential(
            nn.GroupNorm(groups, widths[0]),
            nn.SiLU(),
            _zero(nn.Conv2d(widths[0], data_shape[0], 3, padding=1)),
        )

    def _res(self, cin: int, cout: int, resample: Resample = "none") -> ResBlock:
        sp = self._spec
        return ResBlock(cin, cout, sp.emb_dim, sp.dropout, sp.groups, sp.scale_shift, resample)

    def _attn(self, ch: int) -> list[nn.Module]:
        """Self-attention, then cross-attention to the tokens when there are any."""
        sp = self._spec
        blocks: list[nn.Module] = [AttentionBlock(ch, sp.num_heads, sp.groups)]
        if sp.context_dim > 0:
            blocks.append(CrossAttentionBlock(ch, sp.context_dim, sp.num_heads, sp.groups))
        return blocks

    def _resample(self, ch: int, mode: Resample) -> nn.Module:
        if self._spec.resblock_updown:
            return self._res(ch, ch, mode)
        return Downsample(ch) if mode == "down" else Upsample(ch)

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
        vec = vector_condition(cond, self.cond_dim, "unet")
        if self.cond_proj is not None and vec is not None:
            emb = emb + self.cond_proj(vec)
        return F.silu(emb)

    def forward(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """Output shaped like ``x`` (B, C, H, W) for times ``t`` (B,) in [0, 1]."""
        emb = self.embed(t, cond)
        context = token_condition(cond, self.context_dim, "unet")
        extra = concat_condition(cond, x, self.cond_channels, "unet")
        parts = [x] + ([extra.to(x.dtype)] if extra is not None else []) + ([_coords(x)] if self.coord_channels else [])
        h = self.inp(torch.cat(parts, dim=1) if len(parts) > 1 else x)
        skips = [h]
        for stage in self.down:
            h = stage(h, emb, context)
            skips.append(h)
        h = self.middle(h, emb, context)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)


def _coords(x: Tensor) -> Tensor:
    """The pixel coordinates (B, 2, H, W): y then x, each from −1 to 1."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(b, 2, h, w)


def _check_scalars(
    data_shape: tuple[int, ...],
    cond_dim: int,
    channels: int,
    num_res_blocks: int,
    num_heads: int,
    groups: int,
    dropout: float,
) -> None:
    """Refuse a wrong data rank and out-of-range sizes, saying what to change."""
    if len(data_shape) != 3 or min(data_shape) < 1:
        raise ConfigError(
            f"unet: data_shape must be an image shape (C, H, W) of positive sizes; got {data_shape}. "
            "For vectors or 2-D points use the 'mlp' backbone."
        )
    if cond_dim < 0:
        raise ConfigError(f"unet: cond_dim must be 0 (unconditional) or positive; got {cond_dim}.")
    named = {"channels": channels, "num_res_blocks": num_res_blocks, "num_heads": num_heads, "groups": groups}
    for name, value in named.items():
        if value < 1:
            raise ConfigError(f"unet: {name} must be at least 1; got {value}.")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"unet: dropout must lie in [0, 1); got {dropout}.")


def _check_sizes(
    data_shape: tuple[int, ...], channel_mult: tuple[int, ...], attention_resolutions: tuple[int, ...]
) -> None:
    """Refuse levels that do not divide the image and attention that is never reached."""
    if not channel_mult or min(channel_mult) < 1:
        raise ConfigError(
            f"unet: channel_mult must be a non-empty list of positive multipliers; got {list(channel_mult)}."
        )
    factor = 2 ** (len(channel_mult) - 1)
    _, h, w = data_shape
    if h % factor or w % factor:
        raise ConfigError(
            f"unet: the image size {h}x{w} must be divisible by 2**(len(channel_mult)-1) = {factor}, "
            f"since channel_mult {list(channel_mult)} halves it {len(channel_mult) - 1} times. "
            "Use fewer levels or pad/resize the images."
        )
    sides = [h // 2**level for level in range(len(channel_mult))]
    never = [r for r in attention_resolutions if r not in sides]
    if never:
        raise ConfigError(
            f"unet: attention_resolutions {list(attention_resolutions)} include {never}, which the "
            f"feature maps never reach; with data_shape {data_shape} and {len(channel_mult)} levels "
            f"the sides are {sides}. Pick resolutions from those (or [] for no attention)."
        )


def _check_widths(
    channels: int,
    channel_mult: tuple[int, ...],
    attention_resolutions: tuple[int, ...],
    side: int,
    num_heads: int,
    groups: int,
) -> None:
    """Refuse widths that GroupNorm or the attention heads cannot split."""
    if channels % groups:
        raise ConfigError(
            f"unet: channels={channels} must be divisible by groups={groups} (GroupNorm splits every "
            "level's channels into that many groups). Change channels or groups."
        )
    last = len(channel_mult) - 1
    with_attn = [
        channels * m
        for lvl, m in enumerate(channel_mult)
        if side // 2**lvl in attention_resolutions or lvl == last
    ]
    bad = [c for c in with_attn if c % num_heads]
    if bad:
        raise ConfigError(
            f"unet: num_heads={num_heads} must divide the channel count of every attention layer; "
            f"these have {bad} channels (the middle block always has attention). "
            "Change num_heads or channels."
        )
