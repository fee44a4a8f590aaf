"""Pieces shared by the backbones: the sinusoidal time embedding and the vector-route check."""

from __future__ import annotations

import math
from collections.abc import Mapping

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
