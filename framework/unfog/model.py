"""The trainable model: a backbone plus its conditioners, routed by kind.

This is also what the EMA copy holds, and what sampling and export load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from unfog.diffusion import Denoiser
from unfog.errors import ConfigError, DataError
from unfog.protocols import ROUTES, Cond, Schedule

Drop = Literal["none", "random", "all"]


class DiffusionModel(nn.Module):
    """A backbone and a named set of conditioners.

    ``encode(batch, drop)`` turns batch fields into conditioning by route: ``vector``
    outputs are concatenated along features, ``tokens`` along the sequence, ``concat`` along
    channels. ``drop`` picks none, a random subset (each conditioner with its own
    ``dropout``), or all rows' conditioning to be replaced by null values.
    """

    def __init__(self, backbone: nn.Module, conditioners: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.conditioners = nn.ModuleDict(dict(conditioners or {}))
        for name, c in self.conditioners.items():
            if c.route not in ROUTES:
                raise ConfigError(
                    f"conditioner {name!r} routes to {c.route!r}; routes are {', '.join(ROUTES)}."
                )

    def forward(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The backbone's output for x_t at time t."""
        return self.backbone(x, t, cond)

    @property
    def fields(self) -> list[str]:
        """The batch fields the conditioners read."""
        return [c.field for c in self.conditioners.values()]

    def encode(self, batch: Mapping[str, Any], n: int, drop: Drop = "none") -> dict[str, Tensor]:
        """Conditioning for ``n`` samples from ``batch`` fields."""
        parts: dict[str, list[Tensor]] = {}
        for name, c in self.conditioners.items():
            if c.field not in batch:
                raise DataError(
                    f"conditioner {name!r} reads the batch field {c.field!r}, which is missing; "
                    f"the batch has {sorted(batch)}."
                )
            mask = _drop_mask(drop, c.dropout, n, self.training)
            parts.setdefault(c.route, []).append(c(batch[c.field], mask))
        dims = {"vector": 1, "tokens": 1, "concat": 1}
        return {route: torch.cat(ts, dim=dims[route]) for route, ts in parts.items()}

    def null_batch(self, n: int) -> dict[str, Any]:
        """Batch fields holding every conditioner's null value."""
        return {c.field: c.null_value(n) for c in self.conditioners.values()}

    def denoiser(
        self,
        schedule: Schedule,
        prediction: str,
        values: Mapping[str, Any] | None,
        n: int,
        guidance: float = 1.0,
        clip: tuple[float, float] | None = None,
        sigma_data: float | None = None,
    ) -> Denoiser:
        """A :class:`Denoiser` for ``n`` samples conditioned on ``values`` (batch fields)."""
        if not self.conditioners:
            return Denoiser(self, schedule, prediction, guidance=guidance, clip=clip, sigma_data=sigma_data)
        cond = self.encode(values or {}, n, "none")
        uncond = self.encode(self.null_batch(n), n, "none") if guidance != 1.0 else None
        return Denoiser(self, schedule, prediction, cond, uncond, guidance, clip, sigma_data)


def _drop_mask(drop: Drop, p: float, n: int, training: bool) -> Tensor | None:
    if drop == "all":
        return torch.ones(n, dtype=torch.bool)
    if drop == "random" and training and p > 0:
        return torch.rand(n) < p
    return None
