"""Euler, Heun, ancestral Euler and DPM-Solver++ against closed forms, with the exact
denoiser of Gaussian data (the oracle of tests/unit/test_samplers.py).

For x₀ ~ N(μ, s²) the probability-flow ODE maps the standardized value of x_t,
q = (x_t − α_t·μ)/√(α_t²s² + σ_t²), to the same standardized value at every other time. The
samplers' last step (into t = 0) returns x̂₀ at the last nonzero time t_L, so the reference for
a grid t_0 > … > t_L > 0 is the exact flow from t_0 to t_L followed by the exact x̂₀ there:
the difference is then purely the solver's discretization error, whose ratio between N and 2N
steps gives the order (1/2 for first order, 1/4 for second, 1/8 for third).

Two continuous schedules keep every step smooth (the discrete ones interpolate log ᾱ linearly
between grid points, which spoils high-order convergence): a cosine VP path with α(1) > 0 and
the rectified-flow path α = 1 − t, σ = t, with α(1) = 0 exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

import unfog
from unfog.diffusion import Denoiser, SeededNoise
from unfog.errors import ConfigError
from unfog.timesteps import sampling_times

MU, S = 1.5, 0.5


def ideal(schedule, prediction: str = "x0") -> Denoiser:
    """The exact denoiser for x₀ ~ N(MU, S²), as a network predicting ``prediction``."""

    def model(x, t, cond):
        a = schedule.alpha(t).to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        sg = schedule.sigma(t).to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        x0 = MU + a * S * S / (a * a * S * S + sg * sg) * (x - a * MU)
        if prediction == "x0":
            return x0
        eps = (x - a * x0) / sg
        return eps if prediction == "eps" else a * eps - sg * x0

    return Denoiser(model, schedule, prediction=prediction)


class GenNoise:
    """One generator for the whole batch (fast), float32 draws."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.g).to(x.dtype)


class NoNoise:
    def randn_like(self, x):
        raise AssertionError("a deterministic sampler asked for noise")


def std_noise(rows: int = 4, cols: int = 5000, seed: int = 0) -> torch.Tensor:
    """N(0, 1) noise standardized to mean 0 and std 1 exactly."""
    z = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z - z.mean()) / z.std()


class SmoothVP:
    """α = cos(0.49·π·t), σ = sin(0.49·π·t): a smooth variance-preserving path, α(1) ≈ 0.03."""

    num_timesteps = None

    def alpha(self, t):
        return torch.cos(0.49 * math.pi * t.to(torch.float64))

    def sigma(self, t):
        return torch.sin(0.49 * math.pi * t.to(torch.float64))

    def sample_t(self, n, *, generator=None, device=None):
        return torch.rand(n, generator=generator, device=device)


class RectifiedFlow:
    """α = 1 − t, σ = t (Liu et al. 2023): pure noise at t = 1, α(1) = 0 exactly."""

    num_timesteps = None

    def alpha(self, t):
        return 1 - t.to(torch.float64)

    def sigma(self, t):
        return t.to(torch.float64)

    def sample_t(self, n, *, generator=None, device=None):
        return torch.rand(n, generator=generator, device=device)


SCHEDULES = {"smooth_vp": SmoothVP, "rectified_flow": RectifiedFlow}


def sampler(name: str, **kw):
    return unfog.create("sampler", name, **kw)


def _alpha_sigma(schedule, t: float) -> tuple[float, float]:
    tt = torch.tensor([t], dtype=torch.float64)
    return float(schedule.alpha(tt)[0]), float(schedule.sigma(tt)[0])


def reference(schedule, times: list[float], x: torch.Tensor) -> torch.Tensor:
    """Exact flow from times[0] to the last nonzero time, then the exact x̂₀ there."""
    a0, s0 = _alpha_sigma(schedule, times[0])
    a1, s1 = _alpha_sigma(schedule, times[-2])
    q = (x - a0 * MU) / math.sqrt(a0 * a0 * S * S + s0 * s0)
    x1 = a1 * MU + q * math.sqrt(a1 * a1 * S * S + s1 * s1)
    return MU + a1 * S * S / (a1 * a1 * S * S + s1 * s1) * (x1 - a1 * MU)


def solver_errors(schedule, name: str, kw: dict, steps: tuple[int, ...], spacing: str = "logsnr") -> list[float]:
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)[None]
    errors = []
    for n in steps:
        times = sampling_times(schedule, n, spacing).tolist()
        out = sampler(name, steps=n, spacing=spacing, **kw).sample(ideal(schedule), x, NoNoise())
        errors.append(float((out - reference(schedule, times, x)).abs().max()))
    return errors


def ratios(errors: list[float]) -> list[float]:
    return [b / a for a, b in zip(errors, errors[1:], strict=False)]


# --------------------------------------------------------------------------- convergence order

# measured (both schedules, logsnr spacing, N = 16 → 32 → 64):
#   euler 0.504, 0.503 · heun 0.213, 0.232 · dpm_solver_pp 2M 0.27-0.28, 0.250 · 3M 0.15, 0.205
ORDER_CASES = [
    ("euler", {}, (0.45, 0.55)),
    ("heun", {}, (0.15, 0.30)),
    ("dpm_solver_pp", dict(order=2), (0.18, 0.32)),
]


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("name,kw,band", ORDER_CASES, ids=["euler", "heun", "dpmpp_2m"])
def test_convergence_order(schedule_name, name, kw, band):
    errors = solver_errors(SCHEDULES[schedule_name](), name, kw, (16, 32, 64))
    r = ratios(errors)
    assert all(band[0] < v < band[1] for v in r), (errors, r)


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_dpm_solver_pp_3m_beats_2m(schedule_name):
    schedule = SCHEDULES[schedule_name]()
    e2 = solver_errors(schedule, "dpm_solver_pp", dict(order=2), (16, 32, 64))
    e3 = solver_errors(schedule, "dpm_solver_pp", dict(order=3), (16, 32, 64))
    # measured e3/e2: 0.76, 0.44, 0.36 (smooth_vp), 0.85, 0.46, 0.37 (rectified_flow)
    assert all(b < a for a, b in zip(e2, e3, strict=False)), (e2, e3)
    assert e3[-1] < 0.5 * e2[-1], (e2, e3)
    assert all(v < 0.23 for v in ratios(e3)), (e3, ratios(e3))


# --------------------------------------------------------------------------- identities


@pytest.mark.parametrize("spacing", ["leading", "trailing", "logsnr", "karras"])
@pytest.mark.parametrize("steps", [7, 30])
def test_euler_equals_deterministic_ddim(spacing, steps):
    schedule = unfog.create("schedule", "linear", num_timesteps=1000)
    noise = SeededNoise.for_indices(0, range(3)).randn_like(torch.zeros(3, 8, dtype=torch.float64))
    den = Denoiser(lambda x, t, c: torch.tanh(x) * (1 + t[:, None].to(x.dtype)) + 0.3, schedule, "eps")
    euler = sampler("euler", steps=steps, spacing=spacing).sample(den, noise, NoNoise())
    ddim = sampler("ddim", steps=steps, eta=0.0, spacing=spacing).sample(den, noise, NoNoise())
    torch.testing.assert_close(euler, ddim, rtol=1e-10, atol=1e-10)


def test_euler_ancestral_eta0_is_euler():
    schedule = SmoothVP()
    noise = std_noise(2, 20, seed=2)
    a = sampler("euler_ancestral", steps=12, eta=0.0, spacing="logsnr").sample(ideal(schedule), noise, NoNoise())
    b = sampler("euler", steps=12, spacing="logsnr").sample(ideal(schedule), noise, NoNoise())
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "name,kw,nfe",
    [("euler", {}, 10), ("heun", {}, 19), ("dpm_solver_pp", dict(order=3), 10), ("euler_ancestral", {}, 10)],
)
def test_denoiser_calls(name, kw, nfe):
    den = ideal(SmoothVP())
    sampler(name, steps=10, spacing="logsnr", **kw).sample(den, std_noise(1, 4), GenNoise(0))
    assert den.nfe == nfe


def test_heun_takes_an_euler_step_out_of_alpha_zero():
    den = ideal(RectifiedFlow())
    out = sampler("heun", steps=10, spacing="uniform").sample(den, std_noise(1, 4), NoNoise())
    assert den.nfe == 18 and torch.isfinite(out).all()


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(
    "name,kw",
    [("euler", {}), ("heun", dict(s_churn=5.0)), ("euler_ancestral", {}), ("dpm_solver_pp", dict(order=3)),
     ("dpm_solver_pp", dict(variant="sde"))],
)
def test_same_for_every_prediction_target(name, kw, prediction):
    schedule = unfog.create("schedule", "cosine", num_timesteps=1000)
    noise = std_noise(2, 30, seed=3)
    s = sampler(name, steps=15, spacing="trailing", **kw)
    ref = s.sample(ideal(schedule, "x0"), noise, GenNoise(4))
    out = s.sample(ideal(schedule, prediction), noise, GenNoise(4))
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8)


# --------------------------------------------------------------------------- stochastic samplers

STOCHASTIC = [
    ("euler_ancestral", dict(steps=200)),
    ("heun", dict(steps=40, s_churn=10.0)),
    ("heun", dict(steps=40, s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)),
    ("dpm_solver_pp", dict(steps=50, variant="sde")),
    ("dpm_solver_pp", dict(steps=50, variant="sde", order=3)),
]
STOCHASTIC_IDS = ["euler_ancestral", "heun_churn", "heun_churn_window", "dpmpp_2m_sde", "dpmpp_3m_sde"]


@pytest.mark.parametrize("name,kw", STOCHASTIC, ids=STOCHASTIC_IDS)
def test_stochastic_same_seed_same_samples(name, kw):
    schedule = unfog.create("schedule", "cosine", num_timesteps=1000)
    s = sampler(name, **{**kw, "steps": 10})
    noise = SeededNoise.for_indices(1, range(4)).randn_like(torch.zeros(4, 6, dtype=torch.float64))

    def run(seed):
        return s.sample(ideal(schedule), noise, SeededNoise.for_indices(seed, range(4)))

    a, b, c = run(11), run(11), run(12)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("schedule_name,spacing", [("smooth_vp", "logsnr"), ("rectified_flow", "uniform")])
@pytest.mark.parametrize("name,kw", STOCHASTIC, ids=STOCHASTIC_IDS)
def test_stochastic_samples_have_the_data_distribution(name, kw, schedule_name, spacing):
    schedule = SCHEDULES[schedule_name]()
    noise = std_noise(4, 5000, seed=5)
    out = sampler(name, spacing=spacing, **kw).sample(ideal(schedule), noise, SeededNoise.for_indices(6, range(4)))
    assert torch.isfinite(out).all()
    n = out.numel()
    assert float(out.mean()) == pytest.approx(MU, abs=5 * S / math.sqrt(n) + 0.005)
    assert float(out.std()) == pytest.approx(S, rel=0.04)


# --------------------------------------------------------------------------- α(1) = 0


@pytest.mark.parametrize(
    "name,kw",
    [("euler", dict(steps=100)), ("heun", dict(steps=20)), ("dpm_solver_pp", dict(steps=20)),
     ("dpm_solver_pp", dict(steps=20, order=3))],
    ids=["euler", "heun", "dpmpp_2m", "dpmpp_3m"],
)
@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_deterministic_from_pure_noise_at_alpha_zero(name, kw, prediction):
    """On rectified flow with a uniform grid the first step starts at α = 0 exactly."""
    schedule = RectifiedFlow()
    assert sampling_times(schedule, 4, "uniform")[0] == 1.0 and _alpha_sigma(schedule, 1.0)[0] == 0.0
    noise = std_noise(2, 500, seed=7)
    out = sampler(name, spacing="uniform", **kw).sample(ideal(schedule, prediction), noise, NoNoise())
    assert torch.isfinite(out).all()
    exact = MU + S * noise  # the flow from x₁ = ε maps the N(0, 1) quantile to the data quantile
    assert float((out - exact).abs().max()) < 0.03


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "name,kw",
    [
        ("euler", dict(steps=0)),
        ("heun", dict(steps=0)),
        ("heun", dict(s_churn=-1.0)),
        ("heun", dict(s_tmin=2.0, s_tmax=1.0)),
        ("heun", dict(s_noise=-0.5)),
        ("euler_ancestral", dict(eta=1.5)),
        ("euler_ancestral", dict(eta=-0.1)),
        ("euler_ancestral", dict(steps=0)),
        ("dpm_solver_pp", dict(order=1)),
        ("dpm_solver_pp", dict(order=4)),
        ("dpm_solver_pp", dict(variant="stochastic")),
        ("dpm_solver_pp", dict(steps=0)),
    ],
)
def test_invalid_arguments_refused(name, kw):
    with pytest.raises(ConfigError):
        sampler(name, **kw)


@pytest.mark.parametrize("name", ["euler", "heun", "euler_ancestral", "dpm_solver_pp"])
def test_discrete_spacing_on_a_continuous_schedule_refused(name):
    with pytest.raises(ConfigError):
        sampler(name, steps=5, spacing="leading").sample(ideal(SmoothVP()), torch.zeros(1, 2, dtype=torch.float64))
