"""DDIM sampling."""

from __future__ import annotations

from torch import Tensor

from unfog import register
from unfog.diffusion import fresh_noise
from unfog.errors import ConfigError
from unfog.protocols import DenoiserFn, DiffusersScheduler, NoiseSource
from unfog.timesteps import Spacing, check_steps, sampler_steps
from unfog_samplers._diffusers import on_grid, spacing_config


@register("sampler", "ddim")
class DDIMSampler:
    """Denoising diffusion implicit models, Eq. (12) of Song et al. (2021).

    From t to s < t: x_s = α_s·x̂₀ + √(σ_s² − c²)·ε̂ + c·z with
    c = η·√(σ_s²/σ_t² · (1 − α_t²/α_s²)) (Eq. 16). η = 0 is deterministic; η = 1 equals
    DDPM with the posterior variance β̃.

    Args:
        steps: number of denoising steps (any number up to T for a discrete schedule).
        eta: stochasticity η in [0, 1].
        spacing: the time grid (``unfog.timesteps``): leading / trailing / linspace grid points
            of a discrete-time model (Lin et al. 2024, Table 2), or uniform / logsnr / karras;
            ``None`` is leading for discrete schedules and uniform for continuous ones.
    """

    def __init__(
        self,
        steps: int = 50,
        eta: float = 0.0,
        spacing: Spacing | None = None,
    ) -> None:
        check_steps("ddim", steps)
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"ddim: eta must lie in [0, 1]; got {eta}.")
        self.steps = steps
        self.eta = eta
        self.spacing = spacing

    def sample(self, denoiser: DenoiserFn, noise: Tensor, rng: NoiseSource | None = None) -> Tensor:
        """Denoise ``noise`` (at t = 1) to data (at t = 0)."""
        x = noise
        for st in sampler_steps(denoiser.schedule, self.steps, self.spacing):
            d = denoiser(x, st.t)
            if st.final:
                return d.x0
            a_t, sg_t, a_s, sg_s = st.alpha_t, st.sigma_t, st.alpha_s, st.sigma_s
            c = self.eta * (sg_s**2 / sg_t**2 * (1 - a_t**2 / a_s**2)) ** 0.5
            x = a_s * d.x0 + max(sg_s**2 - c**2, 0.0) ** 0.5 * d.eps
            if c > 0:
                x = x + c * fresh_noise(rng, x)
        return x

    def diffusers_scheduler(self, num_timesteps: int) -> DiffusersScheduler:
        """diffusers' ``DDIMScheduler``, the same step (Song et al. 2021, Eq. 12); exact where its
        fixed stride T//S lands on this sampler's grid."""
        config = spacing_config(self.spacing, "DDIMScheduler", grid_only=True)
        config["set_alpha_to_one"] = True  # the last step lands on x̂₀, as unfog's does
        call = {"num_inference_steps": self.steps, "eta": float(self.eta)}
        return DiffusersScheduler("DDIMScheduler", config, call, exact=on_grid(self.spacing, self.steps, num_timesteps))
