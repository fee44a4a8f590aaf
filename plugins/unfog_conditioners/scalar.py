"""Conditioning on a continuous attribute through Fourier features."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from unfog import register
from unfog.errors import ConfigError, DataError


@register("conditioner", "scalar")
class Scalar(nn.Module):
    """Embeds one real number per sample (a brightness, an angle, a year, …).

    The value is mapped to u = (value − low)/(high − low) and expanded into the features
    [u, sin(2^k·π·u), cos(2^k·π·u)] for k < ``frequencies`` (the positional encoding of
    Mildenhall et al. 2020; Tancik et al. 2020 on why Fourier features let an MLP resolve
    fine differences of a low-dimensional input), then an MLP gives a ``dim``-wide vector
    on the ``vector`` route. A NaN value means "no value": it and the rows dropped for
    classifier-free guidance (probability ``dropout``) get a learned null vector.

    Args:
        field: the batch field holding the value.
        low: the value mapped to u = 0.
        high: the value mapped to u = 1 (values outside [low, high] are allowed).
        dim: embedding width.
        frequencies: number of octaves of sine/cosine features.
        dropout: probability of replacing a value by the null vector while training.
    """

    route = "vector"

    def __init__(self, field: str = "value", low: float = 0.0, high: float = 1.0, dim: int = 128,
                 frequencies: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        if not (math.isfinite(low) and math.isfinite(high)) or not high > low:
            raise ConfigError(f"scalar: need finite low < high; got low={low}, high={high}.")
        if frequencies < 0:
            raise ConfigError(f"scalar: frequencies must be at least 0; got {frequencies}.")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"scalar: dropout must lie in [0, 1); got {dropout}.")
        self.field, self.low, self.high = field, float(low), float(high)
        self.dim, self.dropout = dim, dropout
        freqs = math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)  # follows from the config
        self.mlp = nn.Sequential(nn.Linear(1 + 2 * frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, value: Any, drop: Tensor | None = None) -> Tensor:
        """Embed values (B,); NaN rows and rows where ``drop`` is true get the null vector."""
        v = torch.as_tensor(value, device=self.null.device)
        if v.ndim != 1 or v.dtype == torch.bool or v.is_complex():
            raise DataError(
                f"scalar: field {self.field!r} must be a 1-D tensor of numbers; "
                f"got dtype {v.dtype} and shape {tuple(v.shape)}."
            )
        v = v.to(torch.float32)
        if bool(torch.isinf(v).any()):
            raise DataError(f"scalar: field {self.field!r} holds infinite values; use NaN for 'no value'.")
        missing = torch.isnan(v)
        if drop is not None:
            missing = missing | drop.to(v.device)
        u = ((torch.nan_to_num(v) - self.low) / (self.high - self.low))[:, None]
        angles = u * self.freqs
        out = self.mlp(torch.cat([u, torch.sin(angles), torch.cos(angles)], dim=1))
        return torch.where(missing[:, None], self.null.expand_as(out), out)

    def null_value(self, n: int) -> Tensor:
        """``n`` missing values (NaN)."""
        return torch.full((n,), float("nan"))

    def grid_values(self, n: int) -> Tensor:
        """``n`` values evenly spread over [low, high], for sample grids drawn while training."""
        return torch.linspace(self.low, self.high, n) if n > 1 else torch.full((n,), (self.low + self.high) / 2)
