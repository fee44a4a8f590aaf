"""The trainable model: a backbone plus its conditioners, routed by kind.

This is also what the EMA copy holds, and what sampling and export load.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from unfog.diffusion import Denoiser
from unfog.errors import ConfigError, DataError
from unfog.protocols import ROUTES, Cond, Schedule

Drop = Literal["none", "random", "all"] | Collection[str]
Guidance = float | Mapping[str, float]  # one scale for all conditioners, or one per conditioner


class DiffusionModel(nn.Module):
    """A backbone and a named set of conditioners.

    ``encode(batch, drop)`` turns batch fields into conditioning by route: ``vector``
    outputs are concatenated along features, ``tokens`` along the sequence, ``concat`` along
    channels. ``drop`` picks none, a random subset (each conditioner with its own
    ``dropout``), all, or the named conditioners whose rows are replaced by null values.
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

    channels_last = False  # set by use_channels_last()

    def use_channels_last(self) -> None:
        """Keep the backbone's weights and the images it sees in channels-last (NHWC) order."""
        self.backbone.to(memory_format=torch.channels_last)
        self.channels_last = True

    def forward(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The backbone's output for x_t at time t."""
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
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
            mask = _drop_mask(drop, name, c.dropout, n, self.training)
            try:
                out = c(batch[c.field], mask)
            except DataError as exc:  # say which of the model's conditioners refused the value
                raise DataError(f"conditioner {name!r}: {exc}") from exc
            parts.setdefault(c.route, []).append(out)
        dims = {"vector": 1, "tokens": 1, "concat": 1}
        return {route: torch.cat(ts, dim=dims[route]) for route, ts in parts.items()}

    def guidance_plan(self, guidance: Guidance) -> tuple[list[frozenset[str]], list[float]]:
        """The conditioners dropped at each guidance level (least conditioned first; the last
        level drops none) and the scale between consecutive levels (see :class:`Denoiser`).

        A single scale applies to every conditioner trained with ``dropout`` > 0; one trained
        without dropout has no unconditional mode and stays on in every level (a
        super-resolution input, say). A mapping gives scales by conditioner name; names left
        out get 1 (always on). Conditioners sharing a scale form one level, in config order.
        """
        names = list(self.conditioners)
        if isinstance(guidance, Mapping):
            unknown = sorted(set(guidance) - set(names))
            if unknown:
                raise ConfigError(
                    f"guidance names {unknown}, but this model's conditioners are {names}; "
                    "give guidance={NAME: SCALE, ...} with those names, or one number for all."
                )
            scales = {k: float(guidance.get(k, 1.0)) for k in names}
            for k, g in scales.items():
                if g != 1.0 and self.conditioners[k].dropout == 0:
                    raise ConfigError(
                        f"guidance.{k}={g}, but conditioner {k!r} was trained with dropout=0, so the model "
                        f"never learned to go without it; leave it out of guidance (scale 1) or train with "
                        f"conditioners.{k}.dropout > 0."
                    )
        else:
            g = float(guidance)
            if g != 1.0 and names and all(c.dropout == 0 for c in self.conditioners.values()):
                raise ConfigError(
                    f"guidance={g} needs a conditioner trained with dropout > 0 (an unconditional mode); "
                    f"this model's conditioners {names} all have dropout=0. Use guidance=1."
                )
            scales = {k: (g if c.dropout > 0 else 1.0) for k, c in self.conditioners.items()}
        groups: dict[float, list[str]] = {}
        for k in names:
            if scales[k] != 1.0:
                groups.setdefault(scales[k], []).append(k)
        order = list(groups)
        levels = [frozenset(k for g in order[i:] for k in groups[g]) for i in range(len(order) + 1)]
        return levels, order

    def denoiser(
        self,
        schedule: Schedule,
        prediction: str,
        values: Mapping[str, Any] | None,
        n: int,
        guidance: Guidance = 1.0,
        clip: tuple[float, float] | None = None,
        sigma_data: float | None = None,
        rescale: float = 0.0,
        interval: Sequence[float] | None = None,
    ) -> Denoiser:
        """A :class:`Denoiser` for ``n`` samples conditioned on ``values`` (batch fields), guided
        by ``guidance`` (one scale or ``{conditioner: scale}``; see :meth:`guidance_plan`)."""
        extra = dict(clip=clip, sigma_data=sigma_data, rescale=rescale,
                     interval=tuple(interval) if interval is not None else None)
        if not self.conditioners:
            if isinstance(guidance, Mapping):
                raise ConfigError(f"guidance={dict(guidance)} names conditioners, but this model has none.")
            return Denoiser(self, schedule, prediction, guidance=guidance, **extra)
        levels, scales = self.guidance_plan(guidance)
        values = values or {}
        cond = self.encode(values, n, "none")
        lower = [self.encode(values, n, dropped) for dropped in levels[:-1]]
        return Denoiser(self, schedule, prediction, cond, lower or None, scales or 1.0, **extra)


def _drop_mask(drop: Drop, name: str, p: float, n: int, training: bool) -> Tensor | None:
    if isinstance(drop, str):
        if drop == "all":
            return torch.ones(n, dtype=torch.bool)
        if drop == "random" and training and p > 0:
            return torch.rand(n) < p
        return None
    return torch.ones(n, dtype=torch.bool) if name in drop else None
