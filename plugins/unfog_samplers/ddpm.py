"""DDPM ancestral sampling."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from unfog import register
from unfog.diffusion import fresh_noise
from unfog.errors import ConfigError
from unfog.protocols import DenoiserFn, DiffusersScheduler, NoiseSource
from unfog.timesteps import Spacing, check_steps, sampler_steps
from unfog_samplers._diffusers import spacing_config


@register("sampler", "ddpm")
class DDPMSampler:
    """Ancestral sampling, Algorithm 2 of Ho et al. (2020), over any subsequence of times.

    From t to s < t, x_s ~ N(μ, v) with the Gaussian posterior q(x_s | x_t, x̂₀) of a
    general path (Kingma et al. 2021, Eqs. 30-33): with α_{t|s} = α_t/α_s and
    σ²_{t|s} = σ_t² − α²_{t|s}·σ_s², μ = α_{t|s}·σ_s²/σ_t²·x_t + α_s·σ²_{t|s}/σ_t²·x̂₀ and
    v = σ²_{t|s}·σ_s²/σ_t² (``small``, Ho's β̃) or v = σ²_{t|s} (``large``, Ho's β). For
    variance-preserving paths this is Ho et al.'s Eq. (7); it also covers rectified flow and
    variance-exploding schedules. No noise on the last step. Fewer steps than T respace the
    process as in Nichol & Dhariwal (2021), Sec. 4.

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
        check_steps("ddpm", steps)
        if variance not in ("small", "large"):
            raise ConfigError(f"ddpm: variance must be 'small' or 'large'; got {variance!r}.")
        self.steps = steps
        self.spacing = spacing
        self.variance = variance

    def sample(self, denoiser: DenoiserFn, noise: Tensor, rng: NoiseSource | None = None) -> Tensor:
        """Denoise ``noise`` (at t = 1) to data (at t = 0)."""
        schedule = denoiser.schedule
        steps = self.steps if self.steps is not None else schedule.num_timesteps or 1000
        x = noise
        for st in sampler_steps(schedule, steps, self.spacing):
            d = denoiser(x, st.t)
            if st.final:
                return d.x0
            a_t, sg_t, a_s, sg_s = st.alpha_t, st.sigma_t, st.alpha_s, st.sigma_s
            a_ts = a_t / a_s
            var_ts = sg_t**2 - a_ts**2 * sg_s**2
            mean = a_ts * sg_s**2 / sg_t**2 * x + a_s * var_ts / sg_t**2 * d.x0
            var = var_ts * sg_s**2 / sg_t**2 if self.variance == "small" else var_ts
            x = mean + var**0.5 * fresh_noise(rng, x)
        return x

    def diffusers_scheduler(self, num_timesteps: int) -> DiffusersScheduler:
        """diffusers' ``DDPMScheduler`` (Ho et al. 2020, Algorithm 2), which steps to the next point
        of the same grid with the same posterior, so the steps are exactly this sampler's."""
        config = spacing_config(self.spacing, "DDPMScheduler", grid_only=True)
        config["variance_type"] = "fixed_small" if self.variance == "small" else "fixed_large"
        steps = self.steps if self.steps is not None else num_timesteps
        return DiffusersScheduler("DDPMScheduler", config, {"num_inference_steps": steps}, exact=True)
