"""DDPM and DDIM against closed forms, with the exact denoiser of Gaussian data.

If x₀ ~ N(μ, s²·I) then x_t = α·x₀ + σ·ε ~ N(α·μ, (α²s² + σ²)·I) and the ideal denoiser is
the posterior mean E[x₀ | x_t] = μ + α·s²/(α²s² + σ²)·(x_t − α·μ). The probability-flow ODE
of Gaussian data is affine with a positive scalar slope, so it maps the noise quantile to
the data quantile: from x₁ at t = 1 it lands on

    x₀ = μ + s·(x₁ − α₁·μ) / √(α₁²s² + σ₁²),

which deterministic DDIM must approach, with first-order error, as the steps grow.

Coordinates are independent under the ideal denoiser, so "many samples" are drawn as a few
rows of many coordinates: this keeps the per-step cost of the schedule look-ups tiny.
"""

from __future__ import annotations

import math

import pytest
import torch

import unfog
from unfog.diffusion import Denoiser, SeededNoise
from unfog.errors import ConfigError
from unfog.testing import NoNoise, OneStreamNoise, gaussian_denoiser, gaussian_flow, standardized_noise

MU, S = 1.5, 0.5


def ideal(schedule, prediction: str = "x0") -> Denoiser:
    """The exact denoiser for x₀ ~ N(MU, S²), as a network predicting ``prediction``."""
    return gaussian_denoiser(schedule, MU, S, prediction)


def exact_flow(schedule, x1: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's exact image at t = 0 of x₁ at t = 1."""
    return gaussian_flow(schedule, x1, 1.0, 0.0, MU, S)


class GridTime:
    """A discrete schedule read at the nearest grid point of t.

    The Denoiser passes t to the schedule as float32, so its α(t), σ(t) differ from the
    sampler's float64 ones by float32 rounding; snapping t to the grid removes that, which
    lets identities between update rules be checked to float64 precision.
    """

    def __init__(self, schedule):
        self.inner = schedule
        self.num_timesteps = schedule.num_timesteps

    def _snap(self, t):
        T = self.num_timesteps
        return torch.round(t.to(torch.float64) * T) / T

    def alpha(self, t):
        return self.inner.alpha(self._snap(t))  # float64, unlike the float32 t

    def sigma(self, t):
        return self.inner.sigma(self._snap(t))

    def sample_t(self, n, *, generator=None, device=None):
        return self.inner.sample_t(n, generator=generator, device=device)


def sampler(name: str, **kw):
    return unfog.create("sampler", name, **kw)


@pytest.fixture(scope="module")
def linear():
    return unfog.create("schedule", "linear", num_timesteps=1000)


@pytest.fixture(scope="module")
def cosine():
    return unfog.create("schedule", "cosine", num_timesteps=1000)


# --------------------------------------------------------------------------- sanity of the oracle


def test_ideal_denoiser_is_the_posterior_mean(linear):
    """Regress x₀ on x_t by least squares on simulated pairs: the slope is α·s²/(α²s²+σ²)."""
    g = torch.Generator().manual_seed(1)
    n = 200_000
    x0 = MU + S * torch.randn(n, generator=g, dtype=torch.float64)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    t = torch.full((1,), 0.3)
    a, sg = float(linear.alpha(t)), float(linear.sigma(t))
    xt = a * x0 + sg * eps
    cov = torch.cov(torch.stack([xt, x0]))
    slope = float(cov[0, 1] / cov[0, 0])
    intercept = float(x0.mean() - slope * xt.mean())
    pred = ideal(linear)(torch.tensor([[0.0, 1.0]], dtype=torch.float64), 0.3).x0[0]
    assert float(pred[1] - pred[0]) == pytest.approx(slope, rel=0.02)
    assert float(pred[0]) == pytest.approx(intercept, abs=0.01)


# --------------------------------------------------------------------------- DDIM, η = 0


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_converges_first_order_to_the_exact_flow(schedule_name, spacing, request):
    schedule = request.getfixturevalue(schedule_name)
    x1 = torch.linspace(-3, 3, 13, dtype=torch.float64)[None]
    target = exact_flow(schedule, x1)
    errors = []
    for steps in (10, 20, 40, 80):
        out = sampler("ddim", steps=steps, eta=0.0, spacing=spacing).sample(ideal(schedule), x1, NoNoise())
        errors.append(float((out - target).abs().max()))
    ratios = [b / a for a, b in zip(errors, errors[1:], strict=False)]
    assert all(0.4 < r < 0.6 for r in ratios), (errors, ratios)
    assert errors[-1] < 0.06, errors


def test_ddim_deterministic_samples_have_the_data_distribution(linear):
    noise = standardized_noise()
    out = sampler("ddim", steps=200, eta=0.0, spacing="trailing").sample(ideal(linear), noise, NoNoise())
    # noise moments are exactly (0, 1), so the exact flow gives these moments
    one = torch.ones(1, dtype=torch.float64)
    a1, s1 = float(linear.alpha(one)), float(linear.sigma(one))
    mean_exact = MU - S * a1 * MU / math.sqrt(a1 * a1 * S * S + s1 * s1)
    assert mean_exact == pytest.approx(MU, rel=0.01)
    assert float(out.mean()) == pytest.approx(mean_exact, abs=2e-3)
    assert float(out.mean()) == pytest.approx(MU, rel=0.01)
    assert float(out.std()) == pytest.approx(S, rel=0.02)
    # and the map is exactly affine: a straight line through the output
    flat_in, flat_out = noise.flatten(), out.flatten()
    slope = float(((flat_in - flat_in.mean()) * (flat_out - flat_out.mean())).sum() / flat_in.square().sum())
    residual = flat_out - flat_out.mean() - slope * (flat_in - flat_in.mean())
    assert float(residual.abs().max()) < 1e-9


def test_ddim_few_leading_steps_still_close(linear):
    noise = standardized_noise(seed=1)
    out = sampler("ddim", steps=50, eta=0.0, spacing="leading").sample(ideal(linear), noise, NoNoise())
    # first-order DDIM with 50 steps shrinks the spread by ~5 %; a wrong respacing breaks it badly
    assert float(out.mean()) == pytest.approx(MU, rel=0.01)
    assert float(out.std()) == pytest.approx(S, rel=0.08)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_is_the_same_for_every_prediction_target(linear, prediction):
    noise = standardized_noise(2, 50, seed=3)
    s = sampler("ddim", steps=30, eta=0.0, spacing="trailing")
    ref = s.sample(ideal(linear, "x0"), noise)
    out = s.sample(ideal(linear, prediction), noise)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_ddim_deterministic_without_rng(linear):
    noise = standardized_noise(2, 10, seed=4)
    den = ideal(linear)
    s = sampler("ddim", steps=20, eta=0.0)
    a, b = s.sample(den, noise), s.sample(den, noise)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert den.nfe == 40  # one call per step


# --------------------------------------------------------------------------- DDPM


def test_ddpm_all_steps_has_the_data_distribution(linear):
    noise = standardized_noise(seed=5)
    den = ideal(linear)
    out = sampler("ddpm").sample(den, noise, OneStreamNoise(6))
    assert den.nfe == 1000
    n = out.numel()
    # injected noise leaves sampling error ~ s/√n in the mean and ~ 1/√(2n) relative in the std
    assert float(out.mean()) == pytest.approx(MU, abs=5 * S / math.sqrt(n))
    assert float(out.std()) == pytest.approx(S, rel=5 / math.sqrt(2 * n) + 0.005)


def wiggly(x, t, cond):
    """A nonlinear stand-in for a network, so identities do not lean on Gaussian data."""
    return torch.tanh(x) * (1 + t[:, None].to(x.dtype)) + 0.3


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [7, 20])
@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_ddim_eta1_equals_ddpm_small(schedule_name, steps, spacing, request):
    """η = 1 gives c² = β̃ and the same mean as DDPM's posterior (Song et al. 2021, Sec. 4.1)."""
    schedule = GridTime(request.getfixturevalue(schedule_name))
    noise = SeededNoise.for_indices(0, range(6)).randn_like(torch.zeros(6, 8, dtype=torch.float64))
    den = Denoiser(wiggly, schedule, prediction="eps")

    def run(name, **kw):
        s = sampler(name, steps=steps, spacing=spacing, **kw)
        return s.sample(den, noise, SeededNoise.for_indices(9, range(6)))

    ddim, ddpm = run("ddim", eta=1.0), run("ddpm", variance="small")
    torch.testing.assert_close(ddim, ddpm, rtol=1e-10, atol=1e-10)
    # neither equals deterministic DDIM, nor DDPM with the large variance
    assert not torch.allclose(run("ddim", eta=0.0), ddim, atol=1e-3)
    assert not torch.allclose(run("ddpm", variance="large"), ddim, atol=1e-3)


def test_ddim_eta1_equals_ddpm_small_float32_time(linear):
    """The same identity through the plain schedule: it holds up to the float32 rounding of the
    time the Denoiser hands to the schedule (relative ~1e-7, amplified by 1/α near t = 1)."""
    noise = SeededNoise.for_indices(0, range(6)).randn_like(torch.zeros(6, 8, dtype=torch.float64))
    den = Denoiser(wiggly, linear, prediction="eps")
    ddim = sampler("ddim", steps=50, eta=1.0).sample(den, noise, SeededNoise.for_indices(9, range(6)))
    ddpm = sampler("ddpm", steps=50).sample(den, noise, SeededNoise.for_indices(9, range(6)))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-5)


def test_ddpm_large_variance_differs_from_small(linear):
    noise = standardized_noise(2, 50, seed=7)
    small = sampler("ddpm", steps=20, variance="small").sample(ideal(linear), noise, OneStreamNoise(1))
    large = sampler("ddpm", steps=20, variance="large").sample(ideal(linear), noise, OneStreamNoise(1))
    assert float(large.std()) > float(small.std())


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_is_the_same_for_every_prediction_target(linear, prediction):
    noise = standardized_noise(2, 50, seed=8)
    s = sampler("ddpm", steps=25, spacing="trailing")
    ref = s.sample(ideal(linear, "x0"), noise, OneStreamNoise(2))
    out = s.sample(ideal(linear, prediction), noise, OneStreamNoise(2))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    "name,kw",
    [("ddim", dict(steps=20, eta=0.5)), ("ddpm", dict(steps=20)), ("ddpm", dict(steps=10, variance="large"))],
)
def test_same_seed_same_samples(linear, name, kw):
    s = sampler(name, **kw)
    noise = SeededNoise.for_indices(1, range(4)).randn_like(torch.zeros(4, 6, dtype=torch.float64))

    def run(seed):
        return s.sample(ideal(linear), noise, SeededNoise.for_indices(seed, range(4)))

    a, b, c = run(11), run(11), run(12)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("name,kw", [("ddpm", dict(steps=30)), ("ddim", dict(steps=30, eta=0.7))])
def test_sample_independent_of_batch(linear, name, kw):
    s = sampler(name, **kw)
    shape = (3, 2)
    idx = list(range(8))
    noise = SeededNoise.for_indices(2, idx).randn_like(torch.zeros(8, *shape, dtype=torch.float64))
    batch = s.sample(ideal(linear), noise, SeededNoise.for_indices(5, idx))
    for k in (0, 5):
        alone_noise = SeededNoise.for_indices(2, [k]).randn_like(torch.zeros(1, *shape, dtype=torch.float64))
        alone = s.sample(ideal(linear), alone_noise, SeededNoise.for_indices(5, [k]))
        torch.testing.assert_close(alone[0], batch[k], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_ddim_eta_out_of_range(eta):
    with pytest.raises(ConfigError):
        sampler("ddim", eta=eta)


def test_steps_above_T_refused(linear):
    noise = torch.zeros(1, 2, dtype=torch.float64)
    for name in ("ddim", "ddpm"):
        with pytest.raises(ConfigError):
            sampler(name, steps=1001).sample(ideal(linear), noise)


def test_ddpm_unknown_variance_refused(linear):
    with pytest.raises(ConfigError):
        sampler("ddpm", steps=5, variance="smal").sample(
            ideal(linear), torch.zeros(1, 2, dtype=torch.float64)
        )


def test_ddpm_zero_steps_refused():
    short = unfog.create("schedule", "linear", num_timesteps=10)
    with pytest.raises(ConfigError):
        sampler("ddpm", steps=0).sample(ideal(short), torch.zeros(1, 2, dtype=torch.float64))


def test_ddim_zero_steps_refused(linear):
    with pytest.raises(ConfigError):
        sampler("ddim", steps=0).sample(ideal(linear), torch.zeros(1, 2, dtype=torch.float64))
