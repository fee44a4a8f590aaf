"""The cosine schedule of improved DDPM, optionally rescaled to zero terminal SNR."""

from __future__ import annotations

import math

import torch

from unfog import register
from unfog.diffusion import DiscreteSchedule
from unfog.errors import ConfigError
from unfog_schedules.linear import check_zero_terminal_snr, zero_terminal_snr_betas


@register("schedule", "cosine")
class CosineSchedule(DiscreteSchedule):
    """ᾱ(t) = f(t)/f(0), f(t) = cos²((t + s)/(1 + s)·π/2), Nichol & Dhariwal (2021), Eq. (17).

    Discretized over T steps as β_i = min(1 − ᾱ(i/T)/ᾱ((i − 1)/T), ``max_beta``).

    Args:
        num_timesteps: T, the number of discrete steps.
        s: small offset keeping β_1 from being too small (0.008 in the paper).
        max_beta: clip on β near t = 1 (0.999 in the paper).
        zero_terminal_snr: after clipping, rescale the betas so that ᾱ_T = 0 (Lin et al. 2024,
            Algorithm 1), making t = 1 pure noise; pair it with ``v`` prediction. The stored
            β_T = 1 is held just below 1, so α(1) ≈ 1e-6·α(1 − 1/T).
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        s: float = 0.008,
        max_beta: float = 0.999,
        zero_terminal_snr: bool = False,
    ) -> None:
        if num_timesteps < 1:
            raise ConfigError(f"cosine: num_timesteps must be at least 1; got {num_timesteps}.")
        if not 0 < max_beta <= 1:
            raise ConfigError(f"cosine: max_beta must lie in (0, 1]; got {max_beta}.")
        t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        check_zero_terminal_snr("cosine", num_timesteps, zero_terminal_snr)
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
        self.zero_terminal_snr = bool(zero_terminal_snr)
        super().__init__(zero_terminal_snr_betas(betas) if zero_terminal_snr else betas)
