"""Sampling time grids: which t values a sampler visits, from t = 1 (noise) down to 0.

Every grid has ``steps`` + 1 descending values ending with t = 0 (clean data). Spacings:

- ``leading``, ``trailing``, ``linspace``: S of the T grid points of a discrete-time model,
  as in Lin et al. (2024), Table 2.
- ``uniform``: evenly spaced in t.
- ``logsnr``: evenly spaced in λ = log(α/σ) (the half log-SNR of Lu et al. 2022).
- ``karras``: σ̃ = σ/α spaced as (σ̃_max^(1/ρ) + i/(n−1)·(σ̃_min^(1/ρ) − σ̃_max^(1/ρ)))^ρ with
  ρ = 7, Karras et al. (2022), Eq. (5).

The continuous spacings work with any schedule, discrete or not. ``logsnr`` and ``karras``
keep σ/α within [0.002, 80], the range Karras et al. (2022, Table 1) use for every dataset,
so schedules that reach α = 0 or σ = 0 (rectified flow, zero terminal SNR) still get a grid
that spends its steps where the data is formed; the last step still goes to t = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from unfog.errors import ConfigError
from unfog.protocols import Schedule, SmallestTime

DISCRETE_SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
CONTINUOUS_SPACINGS: tuple[str, ...] = ("uniform", "logsnr", "karras")
SPACINGS: tuple[str, ...] = DISCRETE_SPACINGS + CONTINUOUS_SPACINGS
SIGMA_RATIO_MIN, SIGMA_RATIO_MAX = 0.002, 80.0  # σ/α range of Karras et al. (2022), Table 1
KARRAS_RHO = 7.0


def discrete_indices(T: int, steps: int, spacing: str) -> Tensor:
    """S = ``steps`` grid indices in 1..T, descending, for a discrete-time model.

    leading: i = k·⌊T/S⌋ + 1; trailing: i = round(T − k·T/S); linspace: round(linspace(1, T, S)).
    """
    if not 1 <= steps <= T:
        raise ConfigError(f"steps must be between 1 and the schedule's T = {T}; got {steps}.")
    if spacing == "leading":
        idx = torch.arange(steps) * (T // steps) + 1
    elif spacing == "trailing":
        idx = torch.round(T - torch.arange(steps, dtype=torch.float64) * T / steps).long()
    elif spacing == "linspace":
        idx = torch.round(torch.linspace(1, T, steps, dtype=torch.float64)).long()
    else:
        raise ConfigError(f"Unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}.")
    return idx.sort(descending=True).values


def log_snr(schedule: Schedule, t: Tensor) -> Tensor:
    """λ(t) = log(α(t)/σ(t)) in float64 (−∞ where α = 0, +∞ where σ = 0)."""
    t = t.to(torch.float64)
    return torch.log(schedule.alpha(t).to(torch.float64)) - torch.log(schedule.sigma(t).to(torch.float64))


def time_at_log_snr(schedule: Schedule, lam: Tensor, iterations: int = 60) -> Tensor:
    """The t in [0, 1] where λ(t) = ``lam``, by bisection (λ falls as t grows)."""
    lo = torch.zeros_like(lam, dtype=torch.float64)
    hi = torch.ones_like(lam, dtype=torch.float64)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        above = log_snr(schedule, mid) > lam
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return (lo + hi) / 2


def _t_min(schedule: Schedule) -> float:
    T = schedule.num_timesteps
    if T is not None:
        return 1.0 / T
    return float(schedule.t_min) if isinstance(schedule, SmallestTime) else 0.0


Spacing = Literal["leading", "trailing", "linspace", "uniform", "logsnr", "karras"]


def sampling_times(schedule: Schedule, steps: int, spacing: str | None = None) -> Tensor:
    """``steps`` + 1 times to visit, descending from near 1, ending with 0 (float64).

    ``spacing=None`` means ``leading`` for a discrete schedule and ``uniform`` otherwise.
    """
    if spacing is None:
        spacing = "leading" if schedule.num_timesteps is not None else "uniform"
    if steps < 1:
        raise ConfigError(f"steps must be at least 1; got {steps}.")
    zero = torch.zeros(1, dtype=torch.float64)
    if spacing in DISCRETE_SPACINGS:
        T = schedule.num_timesteps
        if T is None:
            raise ConfigError(
                f"spacing={spacing!r} picks points of a discrete training grid, but this schedule is "
                f"continuous; use one of {', '.join(CONTINUOUS_SPACINGS)}."
            )
        return torch.cat([discrete_indices(T, steps, spacing).to(torch.float64) / T, zero])
    if spacing not in CONTINUOUS_SPACINGS:
        raise ConfigError(f"Unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}.")
    t_min = _t_min(schedule)
    if spacing == "uniform":
        if t_min == 0.0:
            return torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        return torch.cat([torch.linspace(1, t_min, steps, dtype=torch.float64), zero])
    ends = log_snr(schedule, torch.tensor([1.0, max(t_min, 1e-12)], dtype=torch.float64))
    lam_lo, lam_hi = (float(v) for v in ends.clamp(-math.log(SIGMA_RATIO_MAX), -math.log(SIGMA_RATIO_MIN)))
    if spacing == "logsnr":
        lam = torch.linspace(lam_lo, lam_hi, steps, dtype=torch.float64)
    else:
        s_max, s_min = math.exp(-lam_lo) ** (1 / KARRAS_RHO), math.exp(-lam_hi) ** (1 / KARRAS_RHO)
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        lam = -KARRAS_RHO * torch.log(s_max + ramp * (s_min - s_max))
    return torch.cat([time_at_log_snr(schedule, lam), zero])


@dataclass(frozen=True)
class Step:
    """One sampler step from t to s < t, with α and σ at both ends (float64 values)."""

    t: float
    s: float
    alpha_t: float
    sigma_t: float
    alpha_s: float
    sigma_s: float

    @property
    def final(self) -> bool:
        """Whether s is clean data (σ_s = 0), where a sampler returns x̂₀."""
        return self.s == 0 or self.sigma_s == 0


def check_steps(owner: str, steps: int | None) -> None:
    """Refuse a step count below 1 when a sampler is built, naming the sampler."""
    if steps is not None and steps < 1:
        raise ConfigError(f"{owner}: steps must be at least 1; got {steps}.")


def sampler_steps(schedule: Schedule, steps: int, spacing: str | None = None) -> list[Step]:
    """The steps of a ``steps``-step sampler on the grid ``spacing``, α and σ computed once."""
    times = sampling_times(schedule, steps, spacing)
    alpha = schedule.alpha(times).to(torch.float64).tolist()
    sigma = schedule.sigma(times).to(torch.float64).tolist()
    t = times.tolist()
    return [Step(t[i], t[i + 1], alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]) for i in range(len(t) - 1)]
