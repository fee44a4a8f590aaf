"""A residual MLP backbone for vectors and 2-D points."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from unfog import register
from unfog.errors import ConfigError
from unfog_backbones.embeddings import concat_condition, sinusoidal_embedding, token_condition, vector_condition


class AttentionPool(nn.Module):
    """Pools tokens (B, L, context_dim) into one vector (B, out_dim) by attention from a learned
    query, as Imagen pools its text embeddings into the time embedding (Saharia et al. 2022)."""

    def __init__(self, context_dim: int, out_dim: int, heads: int = 4) -> None:
        super().__init__()
        heads = heads if out_dim % heads == 0 else 1
        self.norm = nn.LayerNorm(context_dim)
        self.query = nn.Parameter(torch.randn(1, 1, out_dim) * out_dim**-0.5)
        self.attn = nn.MultiheadAttention(out_dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True)

    def forward(self, tokens: Tensor) -> Tensor:
        kv = self.norm(tokens)
        out, _ = self.attn(self.query.expand(tokens.shape[0], -1, -1).to(kv.dtype), kv, kv, need_weights=False)
        return out[:, 0]


class _Block(nn.Module):
    """Pre-norm residual block: h + Linear(Dropout(SiLU(Linear(LayerNorm(h)) + proj(emb))))."""

    def __init__(self, hidden: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.fc1(self.norm(h)) + self.emb(emb)
        return h + self.fc2(self.drop(nn.functional.silu(z)))


@register("backbone", "mlp")
class MLPBackbone(nn.Module):
    """Residual MLP for vectors and 2-D points, time-embedded as in DDPM (Ho et al. 2020).

    The sinusoidal embedding of 1000·t goes through a two-layer MLP; it (plus the projected
    ``"vector"`` conditioning, if any) is added inside every pre-norm residual block, and the
    output layer starts at zero. ``"concat"`` conditioning (B, ``cond_channels``) is appended
    to the input features; ``"tokens"`` (B, L, ``context_dim``) are pooled by attention into
    one more vector added to the time embedding (:class:`AttentionPool`).

    Args:
        hidden: width of the residual stream.
        depth: number of residual blocks.
        time_dim: width of the time embedding.
        dropout: dropout probability inside the residual blocks.
    """

    data_ranks: ClassVar[tuple[int, ...]] = (1,)
    routes: ClassVar[tuple[str, ...]] = ("vector", "tokens", "concat")

    def __init__(
        self,
        data_shape: tuple[int, ...],
        cond_dim: int = 0,
        context_dim: int = 0,
        cond_channels: int = 0,
        hidden: int = 256,
        depth: int = 4,
        time_dim: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check(tuple(data_shape), cond_dim, hidden, depth, time_dim, dropout)
        self.data_shape = tuple(data_shape)
        self.cond_dim = cond_dim
        self.cond_channels = cond_channels
        self.context_dim = context_dim
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.cond_proj = nn.Linear(cond_dim, time_dim) if cond_dim > 0 else None
        self.token_pool = AttentionPool(context_dim, time_dim) if context_dim > 0 else None
        self.inp = nn.Linear(data_shape[0] + cond_channels, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, time_dim, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, data_shape[0])
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def embed(self, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """Time embedding of ``t`` (B,) plus the projected vector conditioning."""
        emb = self.time_mlp(sinusoidal_embedding(t, self.time_dim).to(self.inp.weight.dtype))
        vec = vector_condition(cond, self.cond_dim, "mlp")
        if self.cond_proj is not None and vec is not None:
            emb = emb + self.cond_proj(vec)
        tokens = token_condition(cond, self.context_dim, "mlp")
        if self.token_pool is not None and tokens is not None:
            emb = emb + self.token_pool(tokens)
        return nn.functional.silu(emb)

    def forward(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """Output shaped like ``x`` (B, D) for times ``t`` (B,) in [0, 1]."""
        emb = self.embed(t, cond)
        extra = concat_condition(cond, x, self.cond_channels, "mlp")
        h = self.inp(x if extra is None else torch.cat([x, extra.to(x.dtype)], dim=1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h)))


def _check(
    data_shape: tuple[int, ...], cond_dim: int, hidden: int, depth: int, time_dim: int, dropout: float
) -> None:
    if len(data_shape) != 1 or data_shape[0] < 1:
        raise ConfigError(
            f"mlp: data_shape must be one positive size (D,) (vectors or points); got {data_shape}. "
            "For images (C, H, W) use the 'unet' backbone."
        )
    if cond_dim < 0:
        raise ConfigError(f"mlp: cond_dim must be 0 (unconditional) or positive; got {cond_dim}.")
    for name, value, least in (("hidden", hidden, 1), ("depth", depth, 1), ("time_dim", time_dim, 2)):
        if value < least:
            raise ConfigError(f"mlp: {name} must be at least {least}; got {value}. Set a larger {name}.")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"mlp: dropout must lie in [0, 1); got {dropout}.")
