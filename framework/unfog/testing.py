"""Contract test suites that every component of a kind must pass.

A plugin's tests subclass the suite for its kind and name the component::

    from unfog.testing import SamplerContract

    class TestMySampler(SamplerContract):
        key = "my_sampler"
        kwargs = {"steps": 10}

unfog's own ``tests/contract`` runs these suites over every registered component.

For samplers there is also a Gaussian oracle: :func:`gaussian_denoiser` is the exact denoiser
of data ~ N(μ, s²) in any prediction target, and :func:`gaussian_flow` the exact
probability-flow map it induces, so a sampler can be checked against closed forms; the noise
sources :class:`OneStreamNoise` and :class:`NoNoise` and :func:`standardized_noise` go with it.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

import torch
from omegaconf import OmegaConf

import unfog
from unfog.config import schema
from unfog.diffusion import (
    Denoiser,
    SeededNoise,
    alpha_sigma,
    check_prediction,
    derivatives,
    expand,
    needs_derivatives,
    training_target,
)
from unfog.protocols import ROUTES, Autoencoder


class Contract:
    """Shared parts: the component's kind, key and constructor arguments."""

    kind: ClassVar[str] = ""
    key: ClassVar[str] = ""
    kwargs: ClassVar[dict[str, Any]] = {}

    def build(self, **extra: Any) -> Any:
        return unfog.create(self.kind, self.key, **{**self.kwargs, **extra})

    def test_registered_with_a_valid_schema(self) -> None:
        entry = unfog.get(self.kind, self.key)
        node = OmegaConf.structured(schema(entry))
        assert node._name_ == self.key
        assert entry.summary, f"{self.kind} {self.key!r} needs a docstring whose first line says what it is"


def gaussian_x0(x: Any, alpha: Any, sigma: Any, mean: float = 0.5, std: float = 0.8) -> Any:
    """E[x₀ | x_t = ``x``] for data ~ N(mean, std²) per coordinate: μ + α·s²/(α²s² + σ²)·(x − α·μ).

    ``alpha`` and ``sigma`` may be floats or tensors that broadcast against ``x``.
    """
    return mean + alpha * std * std / (alpha * alpha * std * std + sigma * sigma) * (x - alpha * mean)


def gaussian_denoiser(schedule: Any, mean: float = 0.5, std: float = 0.8, prediction: str = "x0") -> Denoiser:
    """The exact denoiser for data ~ N(mean, std²) per coordinate, as a network predicting
    ``prediction`` (any of ``unfog.diffusion.PREDICTIONS``), so a sampler's output can be
    checked against closed forms (:func:`gaussian_flow`).

    The network reads α(t) and σ(t) from ``schedule`` as the :class:`Denoiser` does when it
    converts back, so every target gives the same x̂₀ up to rounding.
    """
    check_prediction(prediction)

    def model(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        a, s = expand(alpha, x), expand(sigma, x)
        x0 = gaussian_x0(x, a, s, mean, std)
        if prediction == "x0":
            return x0
        derivs = derivatives(schedule, t) if needs_derivatives(prediction) else (None, None)
        return training_target(x0, (x - a * x0) / s, alpha, sigma, prediction, *derivs)

    return Denoiser(model, schedule, prediction=prediction)


def gaussian_flow(schedule: Any, x: torch.Tensor, t: float, s: float, mean: float = 0.5,
                  std: float = 0.8) -> torch.Tensor:
    """The exact probability-flow ODE image at time ``s`` of ``x`` at time ``t``, for data ~ N(mean, std²).

    x_t ~ N(α_t·μ, α_t²s² + σ_t²) and the flow is affine with a positive slope, so it keeps the
    standardized value q = (x_t − α_t·μ)/√(α_t²s² + σ_t²); α and σ are taken in float64.
    """
    a_t, s_t = alpha_sigma(schedule, t)
    a_s, s_s = alpha_sigma(schedule, s)
    q = (x - a_t * mean) / math.sqrt(a_t * a_t * std * std + s_t * s_t)
    return a_s * mean + q * math.sqrt(a_s * a_s * std * std + s_s * s_s)


def standardized_noise(rows: int = 4, cols: int = 5000, seed: int = 0) -> torch.Tensor:
    """N(0, 1) noise (float64) standardized to mean 0 and std 1 exactly, so a deterministic
    affine sampler's output moments carry no sampling error."""
    z = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z - z.mean()) / z.std()


class OneStreamNoise:
    """A noise source with one generator for the whole batch: much faster than
    :class:`~unfog.diffusion.SeededNoise` for large batches, but a sample's noise depends on the
    batch. Draws float32 (several times faster than float64) and casts to ``x``'s dtype."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.g).to(x.dtype)


class NoNoise:
    """A noise source that fails when asked for noise: passing it proves a sampler deterministic."""

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a deterministic sampler asked for noise")


class SamplerContract(Contract):
    """A sampler maps noise to data of the same shape, reproducibly, per sample."""

    kind = "sampler"
    schedule: ClassVar[tuple[str, dict[str, Any]]] = ("cosine", {"num_timesteps": 200})

    def _run(self, indices: list[int], seed: int = 0) -> torch.Tensor:
        name, kw = self.schedule
        den = gaussian_denoiser(unfog.create("schedule", name, **kw))
        rng = SeededNoise.for_indices(seed, indices)
        noise = rng.randn_like(torch.empty(len(indices), 3))
        return self.build().sample(den, noise, rng)

    def test_shape_and_finite(self) -> None:
        out = self._run(list(range(16)))
        assert out.shape == (16, 3) and torch.isfinite(out).all()

    def test_reproducible_and_independent_of_batch(self) -> None:
        batch = self._run(list(range(6)), seed=3)
        again = self._run(list(range(6)), seed=3)
        alone = self._run([4], seed=3)
        torch.testing.assert_close(batch, again, rtol=0, atol=0)
        torch.testing.assert_close(batch[4:5], alone, rtol=1e-5, atol=1e-5)

    def test_moves_towards_the_data(self) -> None:
        out = self._run(list(range(2000)))
        assert abs(float(out.mean()) - 0.5) < 0.1 and abs(float(out.std()) - 0.8) < 0.15


class ScheduleContract(Contract):
    """α and σ lie in [0, 1]-ish ranges, α falls and σ rises with t, t samples in (0, 1]."""

    kind = "schedule"

    def test_alpha_sigma(self) -> None:
        s = self.build()
        t = torch.linspace(0, 1, 101)
        a, g = s.alpha(t), s.sigma(t)
        assert a.shape == t.shape and g.shape == t.shape
        assert torch.isfinite(a).all() and torch.isfinite(g).all()
        assert (a[1:] <= a[:-1] + 1e-6).all() and (g[1:] >= g[:-1] - 1e-6).all()
        assert float(a[0]) > 0.99 and float(g[0]) < 0.01

    def test_sample_t(self) -> None:
        s = self.build()
        t = s.sample_t(1000, generator=torch.Generator().manual_seed(0))
        assert t.shape == (1000,) and float(t.min()) > 0 and float(t.max()) <= 1


class BackboneContract(Contract):
    """Output shaped like the input, conditioning accepted, gradients reach every parameter."""

    kind = "backbone"
    data_shape: ClassVar[tuple[int, ...]] = ()

    def _shape(self) -> tuple[int, ...]:
        if self.data_shape:
            return self.data_shape
        rank = unfog.get(self.kind, self.key).obj.data_ranks[0]
        return {1: (4,), 2: (2, 16), 3: (1, 8, 8)}[rank]

    def test_forward_shape(self) -> None:
        shape = self._shape()
        net = self.build(data_shape=shape, cond_dim=0)
        x = torch.randn(3, *shape)
        assert net(x, torch.rand(3), {}).shape == x.shape

    def test_every_route_reaches_the_output_and_gradients_reach_every_parameter(self) -> None:
        routes = unfog.get(self.kind, self.key).obj.routes
        shape = self._shape()
        wiring = {"cond_dim": 5 if "vector" in routes else 0, "context_dim": 6 if "tokens" in routes else 0,
                  "cond_channels": 2 if "concat" in routes else 0}
        net = self.build(data_shape=shape, **wiring)
        for p in net.parameters():  # undo zero-initialised output layers so every path gets gradient
            if p.detach().abs().sum() == 0:
                torch.nn.init.normal_(p, std=0.02)
        x, t = torch.randn(3, *shape), torch.rand(3)
        cond = {}
        if wiring["cond_dim"]:
            cond["vector"] = torch.randn(3, 5)
        if wiring["context_dim"]:
            cond["tokens"] = torch.randn(3, 4, 6)
        if wiring["cond_channels"]:
            cond["concat"] = torch.randn(3, 2, *shape[1:])
        out = net(x, t, cond)
        with torch.no_grad():
            for route in cond:
                changed = net(x, t, {**cond, route: cond[route] + torch.randn_like(cond[route])})
                assert not torch.allclose(changed, out), f"the {route!r} route does not reach the output"
        out.square().mean().backward()
        missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"parameters without gradient (DDP would fail): {missing[:5]}"


class ConditionerContract(Contract):
    """Embeds n values on a known route — (n, dim) for ``vector``, (n, L, dim) for ``tokens``,
    (n, dim, ...) for ``concat`` — and dropped rows equal the null embedding."""

    kind = "conditioner"
    values: ClassVar[Any] = None

    def test_embed_and_null(self) -> None:
        c = self.build()
        assert c.route in ROUTES
        values = self.values if self.values is not None else c.null_value(4)
        n = len(values)
        out = c(values)
        width = {"vector": out.shape[-1] if out.ndim == 2 else None,
                 "tokens": out.shape[-1] if out.ndim == 3 else None,
                 "concat": out.shape[1] if out.ndim >= 2 else None}[c.route]
        assert out.shape[0] == n and width == c.dim, f"{c.route} output of shape {tuple(out.shape)}, dim {c.dim}"
        dropped = c(values, torch.ones(n, dtype=torch.bool))
        torch.testing.assert_close(dropped, c(c.null_value(n)))


class DatasetContract(Contract):
    """Items are dicts whose ``x`` has ``data_shape``, within ``data_range``, with ``fields``."""

    kind = "dataset"

    def test_items_match_metadata(self) -> None:
        ds = self.build()
        assert len(ds) > 0
        item = ds[0]
        assert set(ds.fields) <= set(item), f"item lacks fields {set(ds.fields) - set(item)}"
        assert tuple(item["x"].shape) == tuple(ds.data_shape)
        assert item["x"].dtype == torch.float32
        if ds.data_range is not None:
            lo, hi = ds.data_range
            assert lo - 1e-6 <= float(item["x"].min()) and float(item["x"].max()) <= hi + 1e-6
        if "label" in ds.fields:
            assert ds.num_classes and 0 <= int(item["label"]) < ds.num_classes


class MetricContract(Contract):
    """update/compute/reset: a metric returns a dict of floats and forgets after reset."""

    kind = "metric"

    def inputs(self) -> dict[str, Any]:
        raise NotImplementedError("give the metric's test inputs as keyword arguments of update()")

    def test_update_compute_reset(self) -> None:
        m = self.build()
        m.update(**self.inputs())
        result = m.compute()
        assert result and all(isinstance(v, (int, float)) for v in result.values())
        m.reset()
        m.update(**self.inputs())
        assert m.compute() == result


class AutoencoderContract(Contract):
    """encode gives a posterior (mean, std ≥ 0) shaped ``(B, *latent_shape(data_shape))``, the
    same mean every time, and a non-negative KL divergence to N(0, I); decode gives data of the
    data's shape; ``settings()``, stored as JSON, rebuilds the same network; a ``lossless``
    autoencoder round-trips exactly. ``data_shape`` comes from ``kwargs``, else the class."""

    kind = "autoencoder"
    data_shape: ClassVar[tuple[int, ...]] = (3, 16, 16)

    def _shape(self) -> tuple[int, ...]:
        return tuple(self.kwargs.get("data_shape", self.data_shape))

    def _built(self) -> Any:
        ae = self.build(data_shape=self._shape())
        return ae.eval() if isinstance(ae, torch.nn.Module) else ae

    def _batch(self, n: int = 2) -> torch.Tensor:
        return torch.rand(n, *self._shape(), generator=torch.Generator().manual_seed(0)) * 2 - 1

    def test_fits_the_protocol(self) -> None:
        ae = self._built()
        assert isinstance(ae, Autoencoder), "needs lossless, flip_equivariant, encode, decode, latent_shape, settings"
        assert isinstance(ae.lossless, bool) and isinstance(ae.flip_equivariant, bool)
        shape = ae.latent_shape(self._shape())
        assert isinstance(shape, tuple) and all(isinstance(s, int) and s > 0 for s in shape), shape
        json.dumps(ae.settings())  # a checkpoint stores it as JSON

    @torch.no_grad()
    def test_posterior(self) -> None:
        ae, x = self._built(), self._batch()
        post = ae.encode(x)
        expected = (len(x), *ae.latent_shape(self._shape()))
        assert tuple(post.mean.shape) == expected and tuple(post.std.shape) == expected, (
            f"posterior of shape {tuple(post.mean.shape)}/{tuple(post.std.shape)}, latent_shape says {expected}"
        )
        assert torch.isfinite(post.mean).all() and torch.isfinite(post.std).all()
        assert (post.std >= 0).all(), "a standard deviation is negative"
        torch.testing.assert_close(ae.encode(x).mean, post.mean, rtol=0, atol=0)
        # KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − log σ²) per coordinate (Kingma & Welling 2014,
        # App. B), only where σ > 0: a deterministic encoder (σ = 0) has no density to compare.
        mean, std = post.mean.double(), post.std.double()
        var = torch.where(std > 0, std * std, 1.0)
        kl = torch.where(std > 0, 0.5 * (mean * mean + var - 1 - var.log()), 0.0).flatten(1).sum(1)
        assert torch.isfinite(kl).all() and (kl >= -1e-9).all(), f"KL divergences {kl.tolist()}"

    @torch.no_grad()
    def test_decode_shape(self) -> None:
        ae, x = self._built(), self._batch()
        out = ae.decode(ae.encode(x).mean)
        assert tuple(out.shape) == tuple(x.shape) and torch.isfinite(out).all()

    def test_settings_rebuild_the_same_network(self) -> None:
        ae = self._built()
        settings = json.loads(json.dumps(ae.settings()))
        again = unfog.create(self.kind, self.key, data_shape=self._shape(), **settings)
        shapes = {k: tuple(v.shape) for k, v in ae.state_dict().items()} if isinstance(ae, torch.nn.Module) else {}
        again_shapes = ({k: tuple(v.shape) for k, v in again.state_dict().items()}
                        if isinstance(again, torch.nn.Module) else {})
        assert again_shapes == shapes, "settings() does not rebuild the same network"
        assert again.settings() == settings

    @torch.no_grad()
    def test_lossless_round_trips(self) -> None:
        ae, x = self._built(), self._batch()
        if ae.lossless:
            torch.testing.assert_close(ae.decode(ae.encode(x).mean), x, rtol=0, atol=0)


class ExporterContract(Contract):
    """An exporter builds from its config node and has ``export(pipeline, out_dir, sampler)``;
    what it writes is tested per format, with a model of the kind it accepts."""

    kind = "exporter"

    def test_builds_and_exports(self) -> None:
        from unfog.protocols import Exporter

        assert isinstance(self.build(), Exporter)


class PipelineContract(Contract):
    """A ``pipeline`` entry is a format :meth:`unfog.pipeline.Pipeline.load` can ask:
    ``recognizes(path)`` and ``from_path(path, use_ema=...)``."""

    kind = "pipeline"

    def test_is_a_format(self) -> None:
        from unfog.pipeline import PipelineFormat

        assert isinstance(unfog.get(self.kind, self.key).obj, PipelineFormat)


class ResolverContract(Contract):
    """An ``auto`` entry chooses from the data: for each of ``data`` (keyword sets of
    ``data_shape``, ``fields``, ``num_classes``) it returns node(s) that name registered
    components of its kind and compose into a config with a valid schema."""

    data: ClassVar[list[dict[str, Any]]] = [
        {"data_shape": (1, 8, 8), "fields": ("x", "label"), "num_classes": 10},
        {"data_shape": (3, 16, 16), "fields": ("x", "caption"), "num_classes": None},
        {"data_shape": (2,), "fields": ("x",), "num_classes": None},
        {"data_shape": (1, 256), "fields": ("x",), "num_classes": None},
    ]

    def test_resolves_to_registered_components(self) -> None:
        import inspect

        from unfog.config import NAME_KEY, component_kwargs

        resolve = unfog.get(self.kind, self.key).obj.resolve
        accepted = inspect.signature(resolve).parameters
        for data in self.data:
            out = resolve(**{k: v for k, v in data.items() if k in accepted})
            nodes = list(out.values()) if self.kind == "conditioner" else [out]
            for node in nodes:
                entry, _ = component_kwargs(self.kind, node)
                assert entry.name == node[NAME_KEY] and entry.name != self.key
