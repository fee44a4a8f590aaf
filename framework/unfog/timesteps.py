"""Sampling time grids: which t values a sampler visits, from t = 1 (noise) down to 0.

For models trained on a discrete grid of T steps (t = i/T, i = 1..T) the three spacings of
Lin et al. (2024), Table 2, choose S of the T grid points; continuous schedules use
``uniform`` (S + 1 evenly spaced times from 1 to 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from unfog.errors import ConfigError
from unfog.protocols import Schedule

SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")


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


def sampling_times(schedule: Schedule, steps: int, spacing: str = "leading") -> Tensor:
    """Times to visit, descending, ending with 0 (clean data): ``steps`` + 1 values (float64).

    Discrete schedules get grid points by ``spacing``; continuous ones a uniform grid.
    """
    T = schedule.num_timesteps
    if T is None:
        if steps < 1:
            raise ConfigError(f"steps must be at least 1; got {steps}.")
        return torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    idx = discrete_indices(T, steps, spacing)
    return torch.cat([idx.to(torch.float64) / T, torch.zeros(1, dtype=torch.float64)])
