"""Heun sampling of the probability-flow ODE, with optional stochastic churn."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from unfog import register
from unfog.diffusion import alpha_sigma, fresh_noise
from unfog.errors import ConfigError
from unfog.protocols import DenoiserFn, DiffusersScheduler, NoiseSource
from unfog.timesteps import Spacing, check_steps, sampler_steps, time_at_log_snr
from unfog_samplers._diffusers import spacing_config


@register("sampler", "heun")
class HeunSampler:
    """Heun's second-order method with stochastic churn, Algorithms 1-2 of Karras et al. (2022).

    In x̃ = x/α and σ̃ = σ/α the probability-flow ODE is dx̃/dσ̃ = ε̂. Each step from t to s < t
    optionally first raises the noise level to σ̃_hat = (1 + γ)·σ̃_t with
    γ = min(s_churn/steps, √2 − 1) when s_tmin ≤ σ̃_t ≤ s_tmax, adding noise of standard
    deviation s_noise·√(σ̃_hat² − σ̃_t²) in x̃ (the time t_hat of σ̃_hat is found by bisection on
    λ = −log σ̃). Then an Euler predictor to s, a second denoiser call there, and the
    trapezoidal corrector x̃_s = x̃_hat + (σ̃_s − σ̃_hat)·(ε̂_hat + ε̂_s)/2, written in x without
    dividing by α_s or σ_s. Steps into t = 0 (σ = 0) and steps out of α = 0 (σ̃ = ∞, e.g.
    rectified flow at t = 1, where no churn is applied either) are plain Euler steps, so the
    sampler makes 2·steps − 1 denoiser calls (one fewer when the first time has α = 0).

    Args:
        steps: number of steps.
        spacing: the time grid (``unfog.timesteps``): leading / trailing / linspace grid points
            of a discrete-time model (Lin et al. 2024, Table 2), or uniform / logsnr / karras;
            ``None`` is leading for discrete schedules and uniform for continuous ones.
        s_churn: total churn S_churn ≥ 0; 0 gives the deterministic Heun sampler.
        s_tmin: churn only where σ̃ = σ/α ≥ s_tmin.
        s_tmax: churn only where σ̃ ≤ s_tmax (``.inf`` in YAML for no upper bound).
        s_noise: scale S_noise of the churn noise (slightly above 1 in Karras et al., Table 5).
    """

    def __init__(
        self,
        steps: int = 25,
        spacing: Spacing | None = None,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
    ) -> None:
        check_steps("heun", steps)
        if not s_churn >= 0.0:
            raise ConfigError(f"heun: s_churn must be at least 0; got {s_churn}.")
        if not 0.0 <= s_tmin <= s_tmax:
            raise ConfigError(f"heun: need 0 <= s_tmin <= s_tmax; got s_tmin={s_tmin}, s_tmax={s_tmax}.")
        if not s_noise >= 0.0:
            raise ConfigError(f"heun: s_noise must be at least 0; got {s_noise}.")
        self.steps = steps
        self.spacing = spacing
        self.s_churn = s_churn
        self.s_tmin = s_tmin
        self.s_tmax = s_tmax
        self.s_noise = s_noise

    def sample(self, denoiser: DenoiserFn, noise: Tensor, rng: NoiseSource | None = None) -> Tensor:
        """Denoise ``noise`` (at the first time, near t = 1) to data (at t = 0)."""
        schedule = denoiser.schedule
        gamma_max = min(self.s_churn / self.steps, math.sqrt(2.0) - 1.0)
        x = noise
        for st in sampler_steps(schedule, self.steps, self.spacing):
            t, s, a_t, sg_t, a_s, sg_s = st.t, st.s, st.alpha_t, st.sigma_t, st.alpha_s, st.sigma_s
            if a_t > 0 and gamma_max > 0 and self.s_tmin <= sg_t / a_t <= self.s_tmax:
                t, x = self._churn(schedule, t, a_t, sg_t, gamma_max, x, rng)
                a_t, sg_t = alpha_sigma(schedule, t)
            d = denoiser(x, t)
            if st.final:
                return d.x0
            x = a_s * d.x0 + sg_s * d.eps  # Euler predictor
            if a_t == 0:
                continue
            e = denoiser(x, s).eps
            x = a_s * d.x0 + sg_s * (d.eps + e) / 2 + (a_s * sg_t / a_t) * (d.eps - e) / 2
        return x

    def _churn(self, schedule, t: float, a_t: float, sg_t: float, gamma: float, x: Tensor,
               rng: NoiseSource | None) -> tuple[float, Tensor]:
        """Raise the noise level of ``x`` from σ̃_t to (1 + γ)·σ̃_t; the new time and x."""
        lam = torch.tensor([-math.log((1.0 + gamma) * sg_t / a_t)], dtype=torch.float64)
        t_hat = float(time_at_log_snr(schedule, lam)[0])
        if t_hat <= t:  # σ̃ is already at the top of the schedule
            return t, x
        a_h, sg_h = alpha_sigma(schedule, t_hat)
        # in x: x_hat = (α_hat/α_t)·x + α_hat·√(σ̃_hat² − σ̃_t²)·s_noise·z
        std = math.sqrt(max(sg_h * sg_h - (a_h * sg_t / a_t) ** 2, 0.0)) * self.s_noise
        return t_hat, (a_h / a_t) * x + std * fresh_noise(rng, x)

    def diffusers_scheduler(self, num_timesteps: int) -> DiffusersScheduler:
        """diffusers' ``HeunDiscreteScheduler`` (Karras et al. 2022, Algorithm 1, without churn):
        the same method, not step for step this one."""
        config = spacing_config(self.spacing, "HeunDiscreteScheduler", flags=("use_karras_sigmas",))
        return DiffusersScheduler("HeunDiscreteScheduler", config, {"num_inference_steps": self.steps},
                                  exact=False, scaled_input=True)
