"""Pieces shared by the backbones: the sinusoidal time embedding and the checks of each
conditioning route (vector, tokens, concat)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from unfog.errors import ConfigError

TIME_SCALE = 1000.0
"""t ∈ [0, 1] is multiplied by this before embedding, so t = i/1000 looks like DDPM's step i."""


def sinusoidal_embedding(
    t: Tensor, dim: int, scale: float = TIME_SCALE, max_period: float = 10000.0
) -> Tensor:
    """Sinusoidal embedding of ``scale·t`` (Vaswani et al. 2017; Ho et al. 2020, Appendix B).

    Feature k < dim/2 is sin(s·ω_k) and feature dim/2 + k is cos(s·ω_k), with
    ω_k = max_period^(−k/(dim/2)); an odd ``dim`` gets one trailing zero.

    Args:
        t: times of shape (B,), any floating or integer dtype.
        dim: embedding width (at least 2).
        scale: factor applied to ``t`` first.
        max_period: the longest wavelength.

    Returns:
        A float32 tensor of shape (B, dim).
    """
    if t.ndim != 1:
        raise ValueError(f"sinusoidal_embedding: t must have shape (B,); got {tuple(t.shape)}.")
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    angles = (t.to(torch.float32) * scale)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def vector_condition(cond: Mapping[str, Tensor], cond_dim: int, component: str) -> Tensor | None:
    """The ``"vector"`` conditioning a backbone built with ``cond_dim`` expects, checked.

    Returns ``None`` for an unconditional backbone (``cond_dim == 0``).

    Raises:
        ConfigError: if the route is missing, unexpected, or of the wrong width.
    """
    vec = cond.get("vector")
    if cond_dim == 0:
        if vec is not None:
            raise ConfigError(
                f"{component}: got 'vector' conditioning of shape {tuple(vec.shape)}, but the backbone "
                "was built unconditional (cond_dim=0). Build it with the conditioners' total width "
                "as cond_dim."
            )
        return None
    if vec is None:
        raise ConfigError(
            f"{component}: built with cond_dim={cond_dim}, so it needs 'vector' conditioning of shape "
            f"(B, {cond_dim}); cond has routes {sorted(cond)}. Pass the conditioners' output "
            "(DiffusionModel.encode) or build the backbone with cond_dim=0."
        )
    if vec.ndim != 2 or vec.shape[1] != cond_dim:
        raise ConfigError(
            f"{component}: 'vector' conditioning must have shape (B, {cond_dim}); "
            f"got {tuple(vec.shape)}. Make cond_dim equal the conditioners' total width."
        )
    return vec


def token_condition(cond: Mapping[str, Tensor], context_dim: int, component: str) -> Tensor | None:
    """The ``"tokens"`` conditioning (B, L, ``context_dim``) for cross-attention, checked;
    ``None`` for a backbone built without cross-attention (``context_dim == 0``)."""
    return _routed(cond, "tokens", context_dim, component, "context_dim", f"(B, L, {context_dim})",
                   lambda v: v.shape[2] if v.ndim == 3 else None)


def concat_condition(cond: Mapping[str, Tensor], x: Tensor, cond_channels: int, component: str) -> Tensor | None:
    """The ``"concat"`` conditioning: ``cond_channels`` extra channels shaped like ``x`` but for
    the channel count, checked; ``None`` for a backbone built without them."""
    def width(v: Tensor) -> int | None:
        same = v.ndim == x.ndim and v.shape[0] == x.shape[0] and v.shape[2:] == x.shape[2:]
        return v.shape[1] if same else None

    want = "(B, " + ", ".join(map(str, (cond_channels, *x.shape[2:]))) + ")"
    return _routed(cond, "concat", cond_channels, component, "cond_channels", want, width)


def _routed(cond: Mapping[str, Tensor], route: str, n: int, component: str, name: str, want: str,
            width: Callable[[Tensor], int | None]) -> Tensor | None:
    v = cond.get(route)
    if n == 0:
        if v is not None:
            raise ConfigError(
                f"{component}: got {route!r} conditioning of shape {tuple(v.shape)}, but the backbone was "
                f"built without it ({name}=0). Build it with the conditioners' {route} width as {name}."
            )
        return None
    if v is None:
        raise ConfigError(
            f"{component}: built with {name}={n}, so it needs {route!r} conditioning of shape {want}; "
            f"cond has routes {sorted(cond)}."
        )
    if width(v) != n:
        raise ConfigError(f"{component}: {route!r} conditioning must have shape {want}; got {tuple(v.shape)}.")
    return v
