"""The variance-exploding noise levels and preconditioning of EDM (Karras et al. 2022)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from unfog import register
from unfog.errors import ConfigError

T_EPS = 1e-6


def _dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


@register("schedule", "edm")
class EDMSchedule:
    """α(t) = 1, σ(t) log-linear from σ_min to σ_max: EDM, Karras et al. (2022), Table 1.

    Karras et al. (2022), "Elucidating the design space of diffusion-based generative models".

    σ(t) = exp(ln σ_min + t·(ln σ_max − ln σ_min)), so t = 0 maps to σ_min, not 0: samplers
    that finish at t = 0 stop at σ = σ_min (EDM's own sampler takes one more step, σ_min → 0;
    the difference, noise of std 0.002, is below 8-bit quantisation of [−1, 1] data).
    Training draws ln σ ~ N(P_mean, P_std²) (Table 1, "Noise distribution") and maps it back
    to t, clamped into [1e-6, 1]; noise levels outside [σ_min, σ_max] land on the ends.
    EDM's preconditioning and loss weighting are the kernel's ``prediction=edm`` and
    ``loss.weighting=edm`` (they work on every schedule); this schedule's ``sigma_data`` is
    their σ_data unless the config sets ``sigma_data``.

    Args:
        sigma_min: σ at t = 0 (0.002 in the paper).
        sigma_max: σ at t = 1 (80 in the paper).
        sigma_data: σ_data, the data's standard deviation (0.5 in the paper), used by
            ``prediction=edm`` and ``loss.weighting=edm``.
        p_mean: P_mean, the mean of ln σ during training (−1.2 in the paper).
        p_std: P_std, the standard deviation of ln σ during training (1.2 in the paper).
    """

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
    ) -> None:
        for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("sigma_data", sigma_data),
                            ("p_mean", p_mean), ("p_std", p_std)):
            if not math.isfinite(value):
                raise ConfigError(f"edm: {name} must be a finite number; got {value}.")
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(
                f"edm: need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max} "
                "(the paper uses 0.002 and 80)."
            )
        if not sigma_data > 0:
            raise ConfigError(f"edm: sigma_data must be positive; got {sigma_data} (0.5 for images in [-1, 1]).")
        if not p_std > 0:
            raise ConfigError(f"edm: p_std must be positive; got {p_std} (the paper uses 1.2).")
        self.num_timesteps: int | None = None
        self.t_min = 0.0
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)
        self._log_min = math.log(sigma_min)
        self._log_range = math.log(sigma_max) - self._log_min

    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale α(t) = 1 (variance exploding)."""
        return 1 + 0 * t.to(_dtype(t))

    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale σ(t) = exp(ln σ_min + t·(ln σ_max − ln σ_min))."""
        tt = t.to(_dtype(t)).clamp(0, 1)
        return torch.exp(self._log_min + tt.to(torch.float64) * self._log_range).to(_dtype(t))

    def dalpha(self, t: Tensor) -> Tensor:
        """dα/dt = 0."""
        return torch.zeros_like(t, dtype=_dtype(t))

    def dsigma(self, t: Tensor) -> Tensor:
        """dσ/dt = σ(t)·(ln σ_max − ln σ_min)."""
        return self.sigma(t) * self._log_range

    def time_at_sigma(self, sigma: Tensor | float) -> Tensor:
        """The t with σ(t) = ``sigma`` (float64, unclamped)."""
        s = torch.as_tensor(sigma, dtype=torch.float64)
        return (torch.log(s) - self._log_min) / self._log_range

    def sample_t(self, n: int, *, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
        """Training times: ln σ ~ N(P_mean, P_std²) mapped to t, clamped into [1e-6, 1], on the CPU."""
        z = torch.randn(n, generator=generator, dtype=torch.float64, device="cpu")
        log_sigma = self.p_mean + self.p_std * z
        t = (log_sigma - self._log_min) / self._log_range
        return t.clamp(T_EPS, 1).to(torch.float32).to(device)
