"""The Diffusion Transformer (DiT) of Peebles & Xie (2023), built from timm's layers.

timm is imported only when a DiT is built, so ``import unfog_backbones`` stays light and
works without it (``pip install 'unfog[dit]'`` adds it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from types import SimpleNamespace
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unfog import register
from unfog.errors import ConfigError
from unfog_backbones.embeddings import concat_condition, sinusoidal_embedding, token_condition, vector_condition

FREQUENCY_DIM = 256
"""Width of the sinusoidal timestep features fed to the timestep MLP (DiT's ``TimestepEmbedder``)."""


class DiTSize(NamedTuple):
    """One row of Table 1 of Peebles & Xie (2023)."""

    depth: int
    hidden_size: int
    num_heads: int


DIT_PRESETS: dict[str, DiTSize] = {
    "S": DiTSize(12, 384, 6),
    "B": DiTSize(12, 768, 12),
    "L": DiTSize(24, 1024, 16),
    "XL": DiTSize(28, 1152, 16),
}
"""DiT model sizes (Peebles & Xie 2023, Table 1); ``create(..., **DIT_PRESETS["B"]._asdict())``."""


def _timm() -> SimpleNamespace:
    """timm's ``PatchEmbed``, ``Attention`` and ``Mlp``, imported on first use."""
    try:
        from timm.layers import Mlp, PatchEmbed
        from timm.models.vision_transformer import Attention
    except ImportError as err:
        raise ConfigError(
            f"dit: backbone=dit is built from timm's layers, but timm cannot be imported ({err}). "
            "Install it with: pip install 'unfog[dit]'"
        ) from err
    return SimpleNamespace(PatchEmbed=PatchEmbed, Attention=Attention, Mlp=Mlp)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive layer norm's affine step, x·(1 + scale) + shift, per sample (Peebles & Xie 2023, Sec. 3.2)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, rows: int, cols: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding of a ``rows``×``cols`` patch grid, (rows·cols, dim).

    As in MAE (He et al. 2022) and DiT: the first half of the features embeds the column,
    the second half the row, each with the 1-D transformer embedding of Vaswani et al. (2017)
    — sin of pos·ω_k then cos of pos·ω_k, ω_k = 10000^(−k/(dim/4)). Patches run row-major,
    as ``PatchEmbed`` flattens them. ``dim`` must be divisible by 4.
    """
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    row, col = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )

    def one_axis(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([one_axis(col), one_axis(row)], dim=1).float()


class CrossAttention(nn.Module):
    """Patches attend to conditioning tokens, residual, output zero-init (PixArt-α, Chen et al. 2023).

    As in PixArt-α the queries come straight from the residual stream and the branch has no
    adaLN modulation or gate of its own; its zero-initialised output projection makes a new
    layer start as the identity. Unlike PixArt-α (which projects the captions once with a
    shared MLP) each layer layer-norms the tokens and projects them to keys and values itself,
    as the U-Net's cross-attention does.
    """

    def __init__(self, hidden_size: int, context_dim: int, num_heads: int, fused_attn: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.fused_attn = fused_attn
        self.q = nn.Linear(hidden_size, hidden_size)
        self.context_norm = nn.LayerNorm(context_dim)
        self.kv = nn.Linear(context_dim, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, n, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q = self.q(x).reshape(b, n, heads, d).transpose(1, 2)  # (B, heads, N, d)
        kv = self.kv(self.context_norm(context.to(x.dtype)))
        k, v = kv.reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, d)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q * d**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return x + self.proj(out.transpose(1, 2).reshape(b, n, c))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero (Peebles & Xie 2023, Fig. 3): from SiLU(c) a linear
    layer regresses shift, scale and gate of both the attention and the MLP branch; the
    layer starts at zero, so each block starts as the identity. ``context_dim > 0`` adds a
    cross-attention layer between them (PixArt-α, Chen et al. 2023)."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float, context_dim: int, fused_attn: bool
    ) -> None:
        super().__init__()
        timm = _timm()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = timm.Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.attn.fused_attn = fused_attn
        self.cross_attn = (
            CrossAttention(hidden_size, context_dim, num_heads, fused_attn) if context_dim > 0 else None
        )
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        gelu_tanh = functools.partial(nn.GELU, approximate="tanh")
        self.mlp = timm.Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=gelu_tanh, drop=0.0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None and context is not None:
            x = self.cross_attn(x, context)
        return x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LayerNorm without affine, adaLN shift and scale, then a linear map of every token to a
    p×p×C_out patch (Peebles & Xie 2023, Sec. 3.2, "Transformer decoder")."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


@register("backbone", "dit")
class DiTBackbone(nn.Module):
    """Diffusion Transformer (DiT) of Peebles & Xie (2023): a ViT over image patches with adaLN-Zero.

    The image (with the ``"concat"`` conditioning stacked onto its channels) is cut into
    ``patch_size``×``patch_size`` patches by timm's ``PatchEmbed``, plus a fixed 2-D sine-cosine
    position embedding (:func:`sincos_pos_embed_2d`); ``depth`` DiT blocks (timm's fused
    ``Attention`` and ``Mlp``, adaLN-Zero) follow, then the final adaLN layer and unpatchify.
    The conditioning c is the timestep embedding — the 256 sinusoidal features of 1000·t
    through Linear→SiLU→Linear — plus the linearly projected ``"vector"`` conditioning (the
    paper adds the class embedding; in unfog the embedding table lives in the ``class_label``
    conditioner). ``"tokens"`` (width ``context_dim``) are attended to by a cross-attention
    layer after each block's self-attention (PixArt-α, Chen et al. 2023). Weights are
    initialised as the paper's code does: Xavier-uniform linear layers (and patch embedding),
    N(0, 0.02) timestep MLP, zero adaLN layers and a zero final layer, so the output starts at
    exactly zero. Table 1's sizes are in :data:`DIT_PRESETS` and ``conf/backbone/dit_*.yaml``.

    Args:
        patch_size: side p of the square patches; the image's height and width must be multiples.
        hidden_size: token width.
        depth: number of DiT blocks.
        num_heads: attention heads; must divide ``hidden_size``.
        mlp_ratio: width of each block's MLP relative to ``hidden_size``.
        learn_sigma: build the final layer with 2·C output channels, as the paper's DiT that
            also learns the variance Σ (Nichol & Dhariwal 2021). unfog's samplers use only the
            mean, so ``forward`` returns the first C channels: the output keeps the shape of
            ``x`` and the parameter count matches the paper's, but the Σ half of the final
            linear layer never gets a gradient. Leave it off except to reproduce the paper.
        fused_attention: use ``F.scaled_dot_product_attention`` (flash / memory-efficient
            kernels); ``False`` computes the softmax explicitly (timm's reference path), for checks.
    """

    data_ranks: ClassVar[tuple[int, ...]] = (3,)
    routes: ClassVar[tuple[str, ...]] = ("vector", "tokens", "concat")

    def __init__(
        self,
        data_shape: tuple[int, ...],
        cond_dim: int = 0,
        context_dim: int = 0,
        cond_channels: int = 0,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = False,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        data_shape = tuple(data_shape)
        _check_inputs(data_shape, cond_dim, context_dim, cond_channels)
        _check_sizes(patch_size, hidden_size, depth, num_heads, mlp_ratio)
        _check_patches(data_shape, patch_size)
        _check_heads(hidden_size, num_heads)
        timm = _timm()
        channels, height, width = data_shape
        self.data_shape = data_shape
        self.cond_dim = cond_dim
        self.context_dim = context_dim
        self.cond_channels = cond_channels
        self.patch_size = patch_size
        self.out_channels = 2 * channels if learn_sigma else channels
        self.grid = (height // patch_size, width // patch_size)
        self.patch_embed = timm.PatchEmbed(
            (height, width), patch_size, channels + cond_channels, hidden_size, bias=True
        )
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, *self.grid)[None], persistent=False)
        self.time_mlp = nn.Sequential(
            nn.Linear(FREQUENCY_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.cond_proj = nn.Linear(cond_dim, hidden_size) if cond_dim > 0 else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim, fused_attention) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """The initialisation of the paper's code (``DiT.initialize_weights``)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        proj = self.patch_embed.proj  # a convolution, initialised like a Linear on flattened patches
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.time_mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_mlp[2].weight, std=0.02)
        zeroed = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for block in self.blocks:
            zeroed.append(block.adaLN_modulation[-1])
            if block.cross_attn is not None:
                zeroed.append(block.cross_attn.proj)  # PixArt-α zero-initialises it too
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed(self, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """Conditioning c (B, hidden_size): timestep embedding of ``t`` plus the projected vector."""
        c = self.time_mlp(sinusoidal_embedding(t, FREQUENCY_DIM).to(self.time_mlp[0].weight.dtype))
        vec = vector_condition(cond, self.cond_dim, "dit")
        if self.cond_proj is not None and vec is not None:
            c = c + self.cond_proj(vec.to(c.dtype))
        return c

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """(B, H/p·W/p, p·p·C_out) tokens back to a (B, C_out, H, W) image."""
        (rows, cols), p, c = self.grid, self.patch_size, self.out_channels
        x = tokens.reshape(tokens.shape[0], rows, cols, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(tokens.shape[0], c, rows * p, cols * p)

    def forward(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """Output shaped like ``x`` (B, C, H, W) for times ``t`` (B,) in [0, 1]."""
        extra = concat_condition(cond, x, self.cond_channels, "dit")
        context = token_condition(cond, self.context_dim, "dit")
        h = self.patch_embed(x if extra is None else torch.cat([x, extra.to(x.dtype)], dim=1))
        h = h + self.pos_embed.to(h.dtype)
        c = self.embed(t, cond)
        for block in self.blocks:
            h = block(h, c, context)
        out = self.unpatchify(self.final_layer(h, c))
        return out[:, : self.data_shape[0]]


def _check_inputs(data_shape: tuple[int, ...], cond_dim: int, context_dim: int, cond_channels: int) -> None:
    """Refuse a wrong data rank and negative conditioning widths."""
    if len(data_shape) != 3 or min(data_shape) < 1:
        raise ConfigError(
            f"dit: data_shape must be an image shape (C, H, W) of positive sizes; got {data_shape}. "
            "For vectors or 2-D points use the 'mlp' backbone."
        )
    named = {"cond_dim": cond_dim, "context_dim": context_dim, "cond_channels": cond_channels}
    for name, value in named.items():
        if value < 0:
            raise ConfigError(f"dit: {name} must be 0 (no such conditioning) or positive; got {value}.")


def _check_sizes(patch_size: int, hidden_size: int, depth: int, num_heads: int, mlp_ratio: float) -> None:
    """Refuse sizes out of range; the 2-D position embedding needs a width divisible by 4."""
    named = {"patch_size": patch_size, "hidden_size": hidden_size, "depth": depth, "num_heads": num_heads}
    for name, value in named.items():
        if value < 1:
            raise ConfigError(f"dit: {name} must be at least 1; got {value}. Set a larger {name}.")
    if hidden_size % 4:
        raise ConfigError(
            f"dit: hidden_size={hidden_size} must be divisible by 4: the 2-D sine-cosine position "
            "embedding gives a quarter of the width to each of sin/cos of the row and the column. "
            f"Use e.g. hidden_size={4 * math.ceil(hidden_size / 4)}."
        )
    if not mlp_ratio > 0 or int(hidden_size * mlp_ratio) < 1:
        raise ConfigError(
            f"dit: mlp_ratio must be positive and leave the MLP at least one unit wide "
            f"(int(hidden_size·mlp_ratio) ≥ 1); got mlp_ratio={mlp_ratio} with hidden_size={hidden_size}. "
            "The paper uses 4.0."
        )


def _check_patches(data_shape: tuple[int, ...], patch_size: int) -> None:
    """Refuse patches that do not tile the image."""
    _, height, width = data_shape
    if height % patch_size or width % patch_size:
        fits = [p for p in range(1, min(height, width) + 1) if height % p == 0 and width % p == 0]
        raise ConfigError(
            f"dit: the image size {height}x{width} must be divisible by patch_size={patch_size} "
            f"(patches tile the image). Use a patch_size from {fits[:8]}, or pad/resize the images."
        )


def _check_heads(hidden_size: int, num_heads: int) -> None:
    """Refuse a head count that does not split the token width."""
    if hidden_size % num_heads:
        fits = [h for h in range(1, min(hidden_size, 32) + 1) if hidden_size % h == 0]
        raise ConfigError(
            f"dit: hidden_size={hidden_size} must be divisible by num_heads={num_heads} (each head "
            f"gets hidden_size/num_heads channels). Change hidden_size, or use num_heads from {fits}."
        )
