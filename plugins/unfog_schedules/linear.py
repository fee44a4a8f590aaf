"""The linear beta schedule of DDPM, optionally rescaled to zero terminal SNR."""

from __future__ import annotations

import torch

from unfog import register
from unfog.diffusion import DiscreteSchedule
from unfog.errors import ConfigError


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Rescale ``betas`` so that ᾱ_T = 0: Lin et al. (2024), "Common diffusion noise schedules
    and sample steps are flawed", Algorithm 1.

    √ᾱ' = (√ᾱ − √ᾱ_T)·√ᾱ_1/(√ᾱ_1 − √ᾱ_T), keeping ᾱ_1, then β'_i = 1 − ᾱ'_i/ᾱ'_{i−1} with
    ᾱ'_0 = 1, so β'_T = 1. Needs at least two betas (float64 in and out).
    """
    betas = betas.to(torch.float64)
    sqrt_abar = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = torch.cat([torch.ones(1, dtype=torch.float64), sqrt_abar**2])
    new = 1 - abar[1:] / abar[:-1]
    new[-1] = 1.0
    return new


def check_zero_terminal_snr(name: str, num_timesteps: int, zero_terminal_snr: bool) -> None:
    """Refuse zero terminal SNR where Algorithm 1 of Lin et al. (2024) is undefined (T = 1)."""
    if zero_terminal_snr and num_timesteps < 2:
        raise ConfigError(
            f"{name}: zero_terminal_snr=True needs num_timesteps >= 2 (it pins the last step to pure "
            f"noise and keeps the first); got {num_timesteps}."
        )


@register("schedule", "linear")
class LinearSchedule(DiscreteSchedule):
    """β_i linear from ``beta_start`` to ``beta_end`` over T steps (Ho et al. 2020, Sec. 4).

    Args:
        num_timesteps: T, the number of discrete steps.
        beta_start: β_1 (1e-4 in the paper).
        beta_end: β_T (0.02 in the paper).
        zero_terminal_snr: rescale the betas so that ᾱ_T = 0 (Lin et al. 2024, Algorithm 1),
            making t = 1 pure noise; pair it with ``v`` prediction, since ``eps`` cannot recover
            x₀ where α = 0. The stored β_T = 1 is held just below 1, so α(1) ≈ 1e-6·α(1 − 1/T).
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        zero_terminal_snr: bool = False,
    ) -> None:
        if num_timesteps < 1:
            raise ConfigError(f"linear: num_timesteps must be at least 1; got {num_timesteps}.")
        if not 0 < beta_start <= beta_end < 1:
            raise ConfigError(
                f"linear: need 0 < beta_start <= beta_end < 1; got {beta_start}, {beta_end}."
            )
        check_zero_terminal_snr("linear", num_timesteps, zero_terminal_snr)
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        self.zero_terminal_snr = bool(zero_terminal_snr)
        super().__init__(zero_terminal_snr_betas(betas) if zero_terminal_snr else betas)
