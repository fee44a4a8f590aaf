"""Euler sampling of the probability-flow ODE."""

from __future__ import annotations

from unfog import register
from unfog.protocols import DiffusersScheduler
from unfog.timesteps import Spacing, check_steps
from unfog_samplers._diffusers import spacing_config
from unfog_samplers.ddim import DDIMSampler


@register("sampler", "euler")
class EulerSampler(DDIMSampler):
    """Euler's method for the probability-flow ODE, Algorithm 1 of Karras et al. (2022).

    In the variables x̃ = x/α and σ̃ = σ/α the ODE is dx̃/dσ̃ = ε̂ (Karras et al., Eq. 4 with
    s(t) = 1/α); one Euler step from t to s < t, x̃_s = x̃_t + (σ̃_s − σ̃_t)·ε̂, is written back
    in x without dividing by α_t as x_s = α_s·x̂₀ + σ_s·ε̂, so it also works where α_t = 0
    (e.g. rectified flow at t = 1). That is exactly the update of deterministic DDIM (η = 0),
    so this sampler is DDIM with η fixed at 0, under the name the ODE literature uses. The
    last step, into t = 0, returns x̂₀. Deterministic: ``rng`` is not used.

    Args:
        steps: number of steps (one denoiser call each).
        spacing: the time grid (``unfog.timesteps``): leading / trailing / linspace grid points
            of a discrete-time model (Lin et al. 2024, Table 2), or uniform / logsnr / karras;
            ``None`` is leading for discrete schedules and uniform for continuous ones.
    """

    def __init__(self, steps: int = 50, spacing: Spacing | None = None) -> None:
        check_steps("euler", steps)
        super().__init__(steps=steps, eta=0.0, spacing=spacing)

    def diffusers_scheduler(self, num_timesteps: int) -> DiffusersScheduler:
        """diffusers' ``EulerDiscreteScheduler`` (Karras et al. 2022, Algorithm 1), which steps in σ̃
        on its own grid and scales its input: the same method, not step for step this one."""
        config = spacing_config(self.spacing, "EulerDiscreteScheduler", flags=("use_karras_sigmas",))
        return DiffusersScheduler("EulerDiscreteScheduler", config, {"num_inference_steps": self.steps},
                                  exact=False, scaled_input=True)
