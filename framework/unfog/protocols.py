"""The contract of each kind of component, as ``typing.Protocol`` classes, and the optional
capabilities a component may add (its own sampling values, exact derivatives, a diffusers
counterpart, ...).

Components do not inherit from these; they only have to fit them. The contract tests in
``tests/contract`` check every registered component against its kind's protocol; the kernel
asks for an optional capability with ``isinstance(obj, Capability)`` and nothing else, so
everything a plugin can offer is listed here (and in docs/plugins.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

# Conditioning routes a backbone may consume; see docs/architecture.md, "Kinds of component".
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



class Posterior(NamedTuple):
    """What an encoder says about one batch of images: a diagonal Gaussian over latents, its
    mean and standard deviation (zeros for a deterministic encoder)."""

    mean: Tensor
    std: Tensor


@runtime_checkable
class Autoencoder(Protocol):
    """The first stage of a latent diffusion model (Rombach et al. 2022): pixels ↔ latents.

    ``encode(x)`` maps a batch of data (B, *data_shape) to a :class:`Posterior` over latents
    (B, *latent_shape(data_shape)); ``decode(z)`` maps latents back to data. The diffusion
    model trains and samples in latent space; the kernel normalises latents (per channel, or
    by the autoencoder's fixed ``scale_factor``) and caches the posterior of every item.

    ``settings()`` gives the constructor arguments that rebuild the same network without
    reading any file (a checkpoint stores them beside the autoencoder's weights): an
    autoencoder built from a weights folder reports the architecture it read there.
    Class attributes: ``lossless`` (decode(encode(x).mean) == x with nothing to learn: the
    pixel-space ``identity``, for which the kernel skips the whole first stage) and
    ``flip_equivariant`` (flipping the input left-right flips the latent exactly, so a
    horizontal flip of the data may be applied to cached latents; false for learned
    convolutional encoders, whose kernels are not mirror-symmetric — the cache then holds the
    posterior of each mirrored image too). An autoencoder built without weights may set
    ``untrained = True``, and ``unfog train`` then says that its latents are a random network's.
    """

    lossless: ClassVar[bool]
    flip_equivariant: ClassVar[bool]

    def encode(self, x: Tensor) -> Posterior: ...

    def decode(self, z: Tensor) -> Tensor: ...

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]: ...

    def settings(self) -> dict[str, Any]: ...


@runtime_checkable
class Exporter(Protocol):
    """Writes a trained generator in another program's format (``unfog export format=NAME``).

    ``export`` gets the loaded :class:`unfog.pipeline.Pipeline`, the output folder and the
    sampler chosen on the command line (whose settings an exporter may translate, e.g. into
    a diffusers scheduler); it returns the folder or file it wrote.
    """

    def export(self, pipeline: Any, out_dir: Any, sampler: Any) -> Any: ...


# ----------------------------------------------------------------- optional capabilities
# A component has one of these when it has the attribute or method; the kernel checks with
# isinstance (they are runtime-checkable) and falls back to the documented default.


@runtime_checkable
class ClassConditioner(Protocol):
    """A conditioner that reads integer class labels: ``labels=...`` of ``unfog sample`` goes to
    it, default sample grids cycle through its classes, grids get one column per class."""

    num_classes: int


@runtime_checkable
class TextConditioner(Protocol):
    """A conditioner that reads strings (``takes_text = True``): ``prompt=``/``prompts=`` of
    ``unfog sample`` go to it, and evaluation records its captions."""

    takes_text: bool


@runtime_checkable
class GridValues(Protocol):
    """A conditioner that picks its own values for ``n`` samples of a default grid (a spread of
    scalars, say) instead of taking them from rows of the data."""

    def grid_values(self, n: int) -> Any: ...


@runtime_checkable
class ExampleValue(Protocol):
    """A conditioner that turns a row of real data into the value it samples with (an
    inpainting conditioner adds a fixed mask to an image, say)."""

    def example_value(self, example: Any) -> Any: ...


@runtime_checkable
class ExactDerivatives(Protocol):
    """A schedule that gives dα/dt and dσ/dt in closed form; without them the kernel
    differentiates ``alpha`` and ``sigma`` (in float64) when a flow target needs them."""

    def dalpha(self, t: Tensor) -> Tensor: ...

    def dsigma(self, t: Tensor) -> Tensor: ...


@runtime_checkable
class SmallestTime(Protocol):
    """A continuous schedule whose sampling grids may end their last noisy step at ``t_min``
    (default 0; discrete schedules use 1/T)."""

    t_min: float


@runtime_checkable
class SigmaData(Protocol):
    """A schedule that knows the data's standard deviation σ_data (EDM); otherwise 0.5."""

    sigma_data: float


@runtime_checkable
class DiscreteBetas(Protocol):
    """A discrete schedule defined by T betas (Ho et al. 2020), as other programs store one."""

    num_timesteps: int
    betas: Tensor


@runtime_checkable
class Sound(Protocol):
    """A dataset of sound: its clips play at ``sample_rate`` samples per second (samples are
    written as WAV files at that rate)."""

    sample_rate: int


@runtime_checkable
class MetricReference(Protocol):
    """A metric that compares with real data: it gets the training (or ``dataset=``) data
    once, before scoring, with its config (so it can cache reference features by hash)."""

    def set_reference(self, dataset: Any, dataset_config: Mapping[str, Any]) -> None: ...


@runtime_checkable
class MetricProtocol(Protocol):
    """A metric that describes how it makes its numbers (feature extractor, weights' hash,
    reference) for the protocol that ``unfog evaluate`` records."""

    def protocol(self) -> dict[str, Any]: ...


class DiffusersScheduler(NamedTuple):
    """A sampler's counterpart in diffusers: the scheduler class, its arguments that follow
    from the sampler's settings (betas, prediction type and clipping are the exporter's), the
    pipeline call that reproduces the sampler, and whether it takes exactly the same steps."""

    scheduler: str
    config: dict[str, Any]
    call: dict[str, Any]
    exact: bool
    scaled_input: bool = False  # needs scheduler.scale_model_input, which DDPMPipeline does not call


@runtime_checkable
class DiffusersCounterpart(Protocol):
    """A sampler that has a diffusers scheduler implementing the same method, for a model
    trained on a discrete schedule of ``num_timesteps`` steps (``unfog export format=diffusers``)."""

    def diffusers_scheduler(self, num_timesteps: int) -> DiffusersScheduler: ...


@runtime_checkable
class FixedLatentScale(Protocol):
    """An autoencoder whose latents are normalised by fixed numbers rather than statistics of
    the data: z_normalised = (z − ``shift_factor``) · ``scale_factor`` (Stable Diffusion's VAE:
    scale 0.18215, shift 0; Rombach et al. 2022, Sec. G)."""

    scale_factor: float
    shift_factor: float


@runtime_checkable
class Upgradable(Protocol):
    """A component that rewrites a config node stored by an older version (a renamed option,
    a former registry name given in ``register(..., replaces=...)``) into one it builds from;
    ``wiring`` is what the checkpoint recorded about the data (``data_shape``, ...)."""

    def upgrade_config(self, node: dict[str, Any], wiring: Mapping[str, Any]) -> dict[str, Any]: ...


@runtime_checkable
class Resolver(Protocol):
    """An ``auto`` entry: it chooses concrete config nodes from the data before anything is
    built. ``resolve`` takes any of ``data_shape``, ``fields`` and ``num_classes`` as
    keywords and returns a node (a backbone) or ``{key: node}`` (conditioners, possibly none).
    The concrete choice is what runs, is printed and is stored in the checkpoint."""

    def resolve(self, **data: Any) -> Any: ...
