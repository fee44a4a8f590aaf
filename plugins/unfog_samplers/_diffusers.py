"""What the samplers share to name their diffusers counterparts (``unfog export format=diffusers``).

Only names and plain values live here: the samplers never import diffusers. unfog's time grids
(:mod:`unfog.timesteps`) map to diffusers' scheduler options as follows: the grid spacings
``leading``, ``trailing`` and ``linspace`` are diffusers' ``timestep_spacing`` of the same name
(Lin et al. 2024, Table 2, which both follow); ``karras`` is ``use_karras_sigmas`` and
``logsnr`` is ``use_lu_lambdas`` where the scheduler has that option; the rest, and those
options where it has not, fall back to diffusers' ``linspace``.
"""

from __future__ import annotations

from typing import Any

from unfog.errors import ConfigError
from unfog.timesteps import DISCRETE_SPACINGS

SPACING_OPTIONS: dict[str, str] = {"karras": "use_karras_sigmas", "logsnr": "use_lu_lambdas"}
"""unfog's continuous spacing → the diffusers scheduler flag that spaces its sigmas the same way."""


def spacing_config(spacing: str | None, scheduler: str, *, grid_only: bool = False,
                   flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """diffusers' options for the sampler's time grid (``None``: leading, unfog's default on a
    discrete schedule). ``grid_only``: the scheduler visits grid points only, so a continuous
    spacing is refused; ``flags``: the options of :data:`SPACING_OPTIONS` the scheduler takes."""
    spacing = spacing or "leading"
    if spacing in DISCRETE_SPACINGS:
        return {"timestep_spacing": spacing, "steps_offset": 0}
    if grid_only:
        raise ConfigError(
            f"diffusers' {scheduler} visits grid points of the discrete schedule only; sampler.spacing="
            f"{spacing} has no counterpart. Export with sampler.spacing=leading, trailing or linspace."
        )
    flag = SPACING_OPTIONS.get(spacing)
    if flag in flags:
        return {flag: True, "steps_offset": 0}
    return {"timestep_spacing": "linspace", "steps_offset": 0}


def on_grid(spacing: str | None, steps: int, num_timesteps: int) -> bool:
    """Whether diffusers' fixed stride of T//S steps reaches exactly unfog's next grid point:
    always for leading spacing, for trailing only when T is divisible by S (Lin et al. 2024, Table 2)."""
    spacing = spacing or "leading"
    return spacing == "leading" or (spacing == "trailing" and num_timesteps % steps == 0)
