"""The contract of each kind of component, as ``typing.Protocol`` classes.

Components do not inherit from these; they only have to fit them. The contract tests in
``tests/contract`` check every registered component against its kind's protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

# Conditioning routes a backbone may consume; see DESIGN.md, "Kinds of component".
ROUTES: tuple[str, ...] = ("vector", "tokens", "concat")
Cond = Mapping[str, Tensor]  # route -> tensor; an unconditional model gets an empty mapping


class Denoised(NamedTuple):
    """A denoiser's answer at (x_t, t): the clean-data estimate and the noise estimate."""

    x0: Tensor
    eps: Tensor


@runtime_checkable
class Backbone(Protocol):
    """The network: maps (x_t, t, cond) to a tensor shaped like x_t.

    Class attributes declare what it supports, checked when a config is composed:
    ``data_ranks`` (ranks of one sample's shape, e.g. ``(1,)`` for vectors, ``(3,)`` for
    C×H×W images) and ``routes`` (the conditioning routes it consumes).
    """

    data_ranks: ClassVar[tuple[int, ...]]
    routes: ClassVar[tuple[str, ...]]

    def __call__(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor: ...


@runtime_checkable
class Schedule(Protocol):
    """The noise process x_t = α(t)·x₀ + σ(t)·ε for t ∈ [0, 1].

    Discrete schedules set ``num_timesteps`` to T and train on the grid t = i/T, i = 1..T;
    continuous ones set it to ``None``.
    """

    num_timesteps: int | None

    def alpha(self, t: Tensor) -> Tensor: ...

    def sigma(self, t: Tensor) -> Tensor: ...

    def sample_t(
        self, n: int, *, generator: torch.Generator | None = None, device: Any = None
    ) -> Tensor: ...


class NoiseSource(Protocol):
    """Gives Gaussian noise shaped like a batch, each row from its own sample's stream."""

    def randn_like(self, x: Tensor) -> Tensor: ...


class DenoiserFn(Protocol):
    """What samplers call: the model plus prediction conversion and guidance."""

    schedule: Schedule

    def __call__(self, x: Tensor, t: Tensor) -> Denoised: ...


@runtime_checkable
class Sampler(Protocol):
    """Turns noise (at t = 1) into data (at t = 0) with a denoiser."""

    def sample(
        self, denoiser: DenoiserFn, noise: Tensor, rng: NoiseSource | None = None
    ) -> Tensor: ...


@runtime_checkable
class Conditioner(Protocol):
    """Turns one batch field into conditioning for one route, with a null value for guidance.

    ``forward(value, drop)`` embeds ``value``; rows where the boolean ``drop`` is true get the
    null (unconditional) embedding. ``dropout`` is the training-time probability of that.
    """

    field: str
    route: str
    dim: int
    dropout: float

    def __call__(self, value: Any, drop: Tensor | None = None) -> Tensor: ...

    def null_value(self, n: int) -> Any: ...


@runtime_checkable
class DatasetLike(Protocol):
    """A torch ``Dataset`` of dicts with ``"x"`` and optional fields, plus metadata.

    ``data_shape`` is one sample's shape, ``data_range`` its value range (``None`` if
    unbounded), ``fields`` the batch fields it provides, ``num_classes`` the number of
    labels (or ``None``).
    """

    data_shape: tuple[int, ...]
    data_range: tuple[float, float] | None
    fields: Sequence[str]
    num_classes: int | None

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@runtime_checkable
class Metric(Protocol):
    """Sample quality: accumulate real and/or generated samples, then compute."""

    def update(
        self, *, generated: Tensor, labels: Tensor | None = None, real: Tensor | None = None
    ) -> None: ...

    def compute(self) -> dict[str, float]: ...

    def reset(self) -> None: ...

