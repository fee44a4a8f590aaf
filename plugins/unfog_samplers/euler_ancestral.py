"""Ancestral Euler sampling."""

from __future__ import annotations

import math

from torch import Tensor

from unfog import register
from unfog.diffusion import fresh_noise
from unfog.errors import ConfigError
from unfog.protocols import DenoiserFn, DiffusersScheduler, NoiseSource
from unfog.timesteps import Spacing, check_steps, sampler_steps
from unfog_samplers._diffusers import spacing_config


@register("sampler", "euler_ancestral")
class EulerAncestralSampler:
    """Ancestral Euler sampling as in k-diffusion; Song et al. (2021, ancestral), Karras et al. (2022, Sec. 4).

    An Euler step of the probability-flow ODE (Karras et al. 2022, Algorithm 1) to a lower noise
    level, then fresh noise back up to the target level, as in ancestral sampling (Song et al.
    2021, "Score-based generative modeling through SDEs", Sec. 4.3); k-diffusion's
    ``sample_euler_ancestral``.

    In x̃ = x/α, σ̃ = σ/α, from t to s < t: σ̃_up = min(σ̃_s, η·σ̃_s·√(1 − σ̃_s²/σ̃_t²)),
    σ̃_down = √(σ̃_s² − σ̃_up²), x̃_s = x̂₀ + σ̃_down·ε̂ + σ̃_up·z. Written in x (with
    σ̃_s/σ̃_t = σ_s·α_t/(α_s·σ_t), which is 0 where α_t = 0): x_s = α_s·x̂₀ + σ_down·ε̂ + σ_up·z
    with σ_up = α_s·σ̃_up, σ_down = α_s·σ̃_down. η = 0 is the plain Euler sampler. The last
    step, into t = 0, returns x̂₀ without noise.

    Args:
        steps: number of steps (one denoiser call each).
        eta: the share η in [0, 1] of each step's noise that is replaced by fresh noise.
        spacing: the time grid (``unfog.timesteps``): leading / trailing / linspace grid points
            of a discrete-time model (Lin et al. 2024, Table 2), or uniform / logsnr / karras;
            ``None`` is leading for discrete schedules and uniform for continuous ones.
    """

    def __init__(self, steps: int = 50, eta: float = 1.0, spacing: Spacing | None = None) -> None:
        check_steps("euler_ancestral", steps)
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"euler_ancestral: eta must lie in [0, 1]; got {eta}.")
        self.steps = steps
        self.eta = eta
        self.spacing = spacing

    def sample(self, denoiser: DenoiserFn, noise: Tensor, rng: NoiseSource | None = None) -> Tensor:
        """Denoise ``noise`` (at the first time, near t = 1) to data (at t = 0)."""
        x = noise
        for st in sampler_steps(denoiser.schedule, self.steps, self.spacing):
            d = denoiser(x, st.t)
            if st.final:
                return d.x0
            a_t, sg_t, a_s, sg_s = st.alpha_t, st.sigma_t, st.alpha_s, st.sigma_s
            ratio = sg_s * a_t / (a_s * sg_t)  # σ̃_s/σ̃_t = e^{-h}, in [0, 1)
            sg_up = min(sg_s, self.eta * sg_s * math.sqrt(max(1.0 - ratio * ratio, 0.0)))
            sg_down = math.sqrt(max(sg_s * sg_s - sg_up * sg_up, 0.0))
            x = a_s * d.x0 + sg_down * d.eps
            if sg_up > 0:
                x = x + sg_up * fresh_noise(rng, x)
        return x

    def diffusers_scheduler(self, num_timesteps: int) -> DiffusersScheduler:
        """diffusers' ``EulerAncestralDiscreteScheduler`` (k-diffusion's ancestral Euler, η = 1):
        the same method, not step for step this one."""
        config = spacing_config(self.spacing, "EulerAncestralDiscreteScheduler")
        return DiffusersScheduler("EulerAncestralDiscreteScheduler", config, {"num_inference_steps": self.steps},
                                  exact=False, scaled_input=True)
