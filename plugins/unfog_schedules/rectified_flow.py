"""The rectified-flow path of Liu et al. (2023), with the logit-normal times of Esser et al. (2024)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from unfog import register
from unfog.errors import ConfigError

TIME_DISTRIBUTIONS: tuple[str, ...] = ("uniform", "logit_normal")
T_EPS = 1e-5


def _dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


@register("schedule", "rectified_flow")
class RectifiedFlowSchedule:
    """α(t) = 1 − t, σ(t) = t: the straight path of rectified flow (Liu et al. 2023, Eq. 1).

    The flow target is then dx_t/dt = ε − x₀. Training times are either uniform or
    logit-normal, t = sigmoid(m + s·z) with z ~ N(0, 1) (Esser et al. 2024, "Scaling
    rectified flow transformers", Eq. 19), which weights the middle of the path more.
    Times are kept in [1e-5, 1 − 1e-5].

    Args:
        time_distribution: ``uniform`` or ``logit_normal`` (the default, as in SD3).
        logit_mean: m, the mean of logit(t) for ``logit_normal`` (0 in SD3).
        logit_std: s, the standard deviation of logit(t) for ``logit_normal`` (1 in SD3).
    """

    def __init__(
        self,
        time_distribution: Literal["uniform", "logit_normal"] = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ) -> None:
        if time_distribution not in TIME_DISTRIBUTIONS:
            raise ConfigError(
                f"rectified_flow: unknown time_distribution {time_distribution!r}; expected one of "
                f"{', '.join(TIME_DISTRIBUTIONS)} (set schedule.time_distribution=...)."
            )
        if not math.isfinite(logit_mean):
            raise ConfigError(f"rectified_flow: logit_mean must be a finite number; got {logit_mean}.")
        if not (math.isfinite(logit_std) and logit_std > 0):
            raise ConfigError(
                f"rectified_flow: logit_std must be a positive finite number; got {logit_std} (SD3 uses 1.0)."
            )
        self.num_timesteps: int | None = None
        self.t_min = 0.0
        self.time_distribution = time_distribution
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)

    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale α(t) = 1 − t."""
        return (1 - t.to(_dtype(t)).clamp(0, 1))

    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale σ(t) = t."""
        return t.to(_dtype(t)).clamp(0, 1)

    def dalpha(self, t: Tensor) -> Tensor:
        """dα/dt = −1."""
        return torch.full_like(t, -1.0, dtype=_dtype(t))

    def dsigma(self, t: Tensor) -> Tensor:
        """dσ/dt = 1."""
        return torch.ones_like(t, dtype=_dtype(t))

    def sample_t(self, n: int, *, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
        """Training times from ``time_distribution``, drawn on the CPU, in [1e-5, 1 − 1e-5]."""
        if self.time_distribution == "uniform":
            t = torch.rand(n, generator=generator, dtype=torch.float64, device="cpu")
        else:
            z = torch.randn(n, generator=generator, dtype=torch.float64, device="cpu")
            t = torch.sigmoid(self.logit_mean + self.logit_std * z)
        return t.clamp(T_EPS, 1 - T_EPS).to(torch.float32).to(device)
