"""The sigmoid schedule of Jabri et al. (2022), continuous in t."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from unfog import register
from unfog.errors import ConfigError

T_EPS = 1e-5


def _dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


def sigmoid_difference(u: Tensor | float, v: Tensor | float) -> Tensor:
    """sigmoid(u) − sigmoid(v) = sinh((u − v)/2) / (2·cosh(u/2)·cosh(v/2)), without cancellation."""
    u, v = torch.as_tensor(u, dtype=torch.float64), torch.as_tensor(v, dtype=torch.float64)
    return torch.sinh((u - v) / 2) / (2 * torch.cosh(u / 2) * torch.cosh(v / 2))


@register("schedule", "sigmoid")
class SigmoidSchedule:
    """ᾱ(t) falling along a rescaled sigmoid, the schedule of Jabri et al. (2022) and Chen (2023).

    Jabri et al. (2022), "Scalable adaptive computation for iterative generation"; Chen (2023),
    "On the importance of noise scheduling for diffusion models", Algorithm 1.

    With u(t) = start + t·(end − start) and S = sigmoid(·/τ),
    γ(t) = (S(end) − S(u(t))) / (S(end) − S(start)) falls from 1 at t = 0 to 0 at t = 1, and the
    path is variance preserving: α = √γ, σ = √(1 − γ), so σ(0) = 0 and α(1) = 0 exactly.
    Differences of sigmoids are computed without cancellation, so σ is accurate near t = 0.
    The derivatives dα/dt and dσ/dt are analytic; they diverge at t = 1 and t = 0 respectively
    (the square roots have infinite slope where γ reaches 0 or 1). Training draws
    t ~ U[1e-5, 1).

    Args:
        start: sigmoid input at t = 0 (−3 in Chen 2023).
        end: sigmoid input at t = 1 (3 in Chen 2023); must exceed ``start``.
        temperature: τ, dividing the sigmoid input; smaller values concentrate the noise
            change around the middle of [0, 1] (1 in Chen 2023, which also uses 0.9–1.1).
    """

    def __init__(self, start: float = -3.0, end: float = 3.0, temperature: float = 1.0) -> None:
        for name, value in (("start", start), ("end", end), ("temperature", temperature)):
            if not math.isfinite(value):
                raise ConfigError(f"sigmoid: {name} must be a finite number; got {value}.")
        if not start < end:
            raise ConfigError(
                f"sigmoid: need start < end so that noise grows with t; got start={start}, end={end} "
                "(the usual values are start=-3, end=3)."
            )
        if not temperature > 0:
            raise ConfigError(f"sigmoid: temperature must be positive; got {temperature} (1.0 is the usual).")
        self.num_timesteps: int | None = None
        self.t_min = 0.0
        self.start = float(start)
        self.end = float(end)
        self.temperature = float(temperature)
        self._norm = float(sigmoid_difference(end / temperature, start / temperature))
        if not self._norm > 0:
            raise ConfigError(
                f"sigmoid: sigmoid(end/temperature) and sigmoid(start/temperature) are equal in float64 "
                f"(start={start}, end={end}, temperature={temperature}); raise the temperature."
            )

    def _parts(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """γ, 1 − γ and u/τ at ``t`` (float64)."""
        t = t.to(torch.float64).clamp(0, 1)
        width, tau = self.end - self.start, self.temperature
        u = (self.start + t * width) / tau
        gamma = torch.sinh((1 - t) * width / (2 * tau)) / (
            2 * torch.cosh(u / 2) * math.cosh(self.end / (2 * tau)) * self._norm
        )
        one_minus = torch.sinh(t * width / (2 * tau)) / (
            2 * torch.cosh(u / 2) * math.cosh(self.start / (2 * tau)) * self._norm
        )
        return gamma.clamp(min=0), one_minus.clamp(min=0), u

    def alpha_bar(self, t: Tensor) -> Tensor:
        """γ(t) = ᾱ(t), the signal variance (float64)."""
        return self._parts(t)[0]

    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale α(t) = √γ(t)."""
        return torch.sqrt(self._parts(t)[0]).to(_dtype(t))

    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale σ(t) = √(1 − γ(t))."""
        return torch.sqrt(self._parts(t)[1]).to(_dtype(t))

    def _dgamma(self, t: Tensor) -> Tensor:
        _, _, u = self._parts(t)
        s = torch.sigmoid(u)
        return -(self.end - self.start) / self.temperature * s * (1 - s) / self._norm

    def dalpha(self, t: Tensor) -> Tensor:
        """dα/dt = γ'/(2α) (−∞ at t = 1)."""
        gamma = self._parts(t)[0]
        return (self._dgamma(t) / (2 * torch.sqrt(gamma))).to(_dtype(t))

    def dsigma(self, t: Tensor) -> Tensor:
        """dσ/dt = −γ'/(2σ) (+∞ at t = 0)."""
        one_minus = self._parts(t)[1]
        return (-self._dgamma(t) / (2 * torch.sqrt(one_minus))).to(_dtype(t))

    def sample_t(self, n: int, *, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
        """Training times t ~ U[1e-5, 1), drawn on the CPU."""
        u = torch.rand(n, generator=generator, dtype=torch.float64, device="cpu")
        return (T_EPS + (1 - T_EPS) * u).to(torch.float32).to(device)
