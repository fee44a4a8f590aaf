"""DDPM ancestral sampling."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from unfog import register
from unfog.diffusion import alpha_sigma
from unfog.errors import ConfigError
from unfog.protocols import DenoiserFn, NoiseSource
from unfog.timesteps import Spacing, sampling_times


@register("sampler", "ddpm")
class DDPMSampler:
    """Ancestral sampling, Algorithm 2 of Ho et al. (2020), over any subsequence of times.

    From t to s < t with ᾱ = α²: β = 1 − ᾱ_t/ᾱ_s, x_s ~ N(μ, v) with the posterior mean
    μ = √ᾱ_s·β/(1 − ᾱ_t)·x̂₀ + √(1 − β)·(1 − ᾱ_s)/(1 − ᾱ_t)·x_t (Ho et al., Eq. 7) and
    v = β̃ = (1 − ᾱ_s)/(1 − ᾱ_t)·β (``small``) or v = β (``large``); no noise on the last step.
    Fewer steps than T respace the process as in Nichol & Dhariwal (2021), Sec. 4.

    Args:
        steps: number of denoising steps; ``None`` uses every step of a discrete schedule
            (1000 for a continuous one).
        spacing: the time grid (``unfog.timesteps``): leading / trailing / linspace grid points
            of a discrete-time model (Lin et al. 2024, Table 2), or uniform / logsnr / karras;
            ``None`` is leading for discrete schedules and uniform for continuous ones.
        variance: the reverse-step variance, β̃ (``small``) or β (``large``).
    """

    def __init__(
        self,
        steps: int | None = None,
        spacing: Spacing | None = None,
        variance: Literal["small", "large"] = "small",
    ) -> None:
        if steps is not None and steps < 1:
            raise ConfigError(f"ddpm: steps must be at least 1 (or null for every step); got {steps}.")
        if variance not in ("small", "large"):
            raise ConfigError(f"ddpm: variance must be 'small' or 'large'; got {variance!r}.")
        self.steps = steps
        self.spacing = spacing
        self.variance = variance

    def sample(self, denoiser: DenoiserFn, noise: Tensor, rng: NoiseSource | None = None) -> Tensor:
        """Denoise ``noise`` (at t = 1) to data (at t = 0)."""
        schedule = denoiser.schedule
        steps = self.steps if self.steps is not None else schedule.num_timesteps or 1000
        times = sampling_times(schedule, steps, self.spacing).tolist()
        x = noise
        for t, s in zip(times[:-1], times[1:]):
            d = denoiser(x, t)
            abar_t = alpha_sigma(schedule, t)[0] ** 2
            abar_s = alpha_sigma(schedule, s)[0] ** 2
            beta = 1.0 - abar_t / abar_s
            mean = (abar_s**0.5 * beta * d.x0 + (1 - beta) ** 0.5 * (1 - abar_s) * x) / (1 - abar_t)
            if s == 0:
                x = mean
                break
            var = beta * (1 - abar_s) / (1 - abar_t) if self.variance == "small" else beta
            z = rng.randn_like(x) if rng is not None else torch.randn_like(x)
            x = mean + var**0.5 * z
        return x
