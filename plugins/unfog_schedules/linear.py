"""The linear beta schedule of DDPM."""

from __future__ import annotations

import torch

from unfog import register
from unfog.diffusion import DiscreteSchedule
from unfog.errors import ConfigError


@register("schedule", "linear")
class LinearSchedule(DiscreteSchedule):
    """β_i linear from ``beta_start`` to ``beta_end`` over T steps (Ho et al. 2020, Sec. 4).

    Args:
        num_timesteps: T, the number of discrete steps.
        beta_start: β_1 (1e-4 in the paper).
        beta_end: β_T (0.02 in the paper).
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        if num_timesteps < 1:
            raise ConfigError(f"linear: num_timesteps must be at least 1; got {num_timesteps}.")
        if not 0 < beta_start <= beta_end < 1:
            raise ConfigError(
                f"linear: need 0 < beta_start <= beta_end < 1; got {beta_start}, {beta_end}."
            )
        super().__init__(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))
