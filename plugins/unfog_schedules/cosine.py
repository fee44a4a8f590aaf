"""The cosine schedule of improved DDPM."""

from __future__ import annotations

import math

import torch

from unfog import register
from unfog.diffusion import DiscreteSchedule
from unfog.errors import ConfigError


@register("schedule", "cosine")
class CosineSchedule(DiscreteSchedule):
    """ᾱ(t) = f(t)/f(0), f(t) = cos²((t + s)/(1 + s)·π/2), Nichol & Dhariwal (2021), Eq. (17).

    Discretized over T steps as β_i = min(1 − ᾱ(i/T)/ᾱ((i − 1)/T), ``max_beta``).

    Args:
        num_timesteps: T, the number of discrete steps.
        s: small offset keeping β_1 from being too small (0.008 in the paper).
        max_beta: clip on β near t = 1 (0.999 in the paper).
    """

    def __init__(self, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> None:
        if num_timesteps < 1:
            raise ConfigError(f"cosine: num_timesteps must be at least 1; got {num_timesteps}.")
        if not 0 < max_beta <= 1:
            raise ConfigError(f"cosine: max_beta must lie in (0, 1]; got {max_beta}.")
        t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
        super().__init__(betas)
