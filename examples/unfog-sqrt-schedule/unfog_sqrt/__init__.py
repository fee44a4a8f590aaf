"""The sqrt noise schedule of Diffusion-LM, packaged as an unfog plugin."""

from __future__ import annotations

import torch

from unfog import register
from unfog.diffusion import DiscreteSchedule


@register("schedule", "sqrt")
class SqrtSchedule(DiscreteSchedule):
    """ᾱ(t) = 1 − √(t + s), the sqrt schedule of Li et al. (2022), Diffusion-LM, Sec. 4.2.

    Args:
        num_timesteps: T, the number of discrete steps.
        s: offset that sets the noise level at t = 0 (1e-4 in the paper).
    """

    def __init__(self, num_timesteps: int = 1000, s: float = 1e-4) -> None:
        t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        abar = (1 - torch.sqrt(t + s)).clamp(min=1e-5)
        super().__init__((1 - abar[1:] / abar[:-1]).clamp(max=0.999))
