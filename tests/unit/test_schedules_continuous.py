"""The continuous schedules (sigmoid, rectified_flow, edm) and zero terminal SNR for the
discrete ones, against the papers' formulas.

References are computed independently here (math / numpy, float64), never through the
schedule classes' own arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import unfog
from unfog.diffusion import derivatives
from unfog.errors import ConfigError
from unfog.timesteps import log_snr, sampling_times

CONTINUOUS = ("sigmoid", "rectified_flow", "edm")
TS = (0.0, 0.01, 0.1, 0.25, 0.5, 0.77, 0.9, 0.99, 1.0)


def make(name: str, **kw):
    return unfog.create("schedule", name, **kw)


def f64(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def ref_sigmoid_gamma(t: float, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> float:
    """Jabri et al. (2022) / Chen (2023), Alg. 1: the sigmoid schedule's ᾱ(t)."""
    v_start, v_end = sig(start / tau), sig(end / tau)
    return (v_end - sig((t * (end - start) + start) / tau)) / (v_end - v_start)


# ---------------------------------------------------------------- formulas


@pytest.mark.parametrize("kw", [{}, dict(start=-3.0, end=3.0, temperature=0.9), dict(start=0.0, end=3.0,
                                                                                   temperature=0.7)])
def test_sigmoid_formula(kw):
    s = make("sigmoid", **kw)
    ref_kw = dict(start=kw.get("start", -3.0), end=kw.get("end", 3.0), tau=kw.get("temperature", 1.0))
    gamma = np.array([ref_sigmoid_gamma(t, **ref_kw) for t in TS])
    t = f64(TS)
    np.testing.assert_allclose(s.alpha(t).numpy(), np.sqrt(np.clip(gamma, 0, 1)), atol=1e-12)
    np.testing.assert_allclose(s.sigma(t).numpy(), np.sqrt(np.clip(1 - gamma, 0, 1)), atol=1e-7)
    a, g = s.alpha(t), s.sigma(t)
    torch.testing.assert_close(a * a + g * g, torch.ones_like(t), atol=1e-12, rtol=0)
    assert float(s.sigma(f64([0.0]))[0]) == 0.0 and float(s.alpha(f64([1.0]))[0]) == 0.0
    assert float(s.alpha(f64([0.0]))[0]) == 1.0 and float(s.sigma(f64([1.0]))[0]) == 1.0


def test_sigmoid_small_t_is_accurate():
    """σ² = 1 − γ near t = 0 without cancellation: γ'(0)·t to first order."""
    s = make("sigmoid")
    t = 1e-9
    slope = 6 * sig(-3) * (1 - sig(-3)) / (sig(3) - sig(-3))
    assert float(s.sigma(f64([t]))[0]) ** 2 == pytest.approx(slope * t, rel=1e-6)


def test_rectified_flow_formula():
    s = make("rectified_flow")
    t = f64(TS)
    torch.testing.assert_close(s.alpha(t), 1 - t, atol=0, rtol=0)
    torch.testing.assert_close(s.sigma(t), t, atol=0, rtol=0)


def test_edm_formula_and_endpoints():
    s = make("edm")
    t = f64(TS)
    ref = np.exp(math.log(0.002) + np.array(TS) * (math.log(80.0) - math.log(0.002)))
    np.testing.assert_allclose(s.sigma(t).numpy(), ref, rtol=1e-12)
    assert float(s.sigma(f64([0.0]))[0]) == pytest.approx(0.002, rel=1e-12)
    assert float(s.sigma(f64([1.0]))[0]) == pytest.approx(80.0, rel=1e-12)
    torch.testing.assert_close(s.alpha(t), torch.ones_like(t), atol=0, rtol=0)
    custom = make("edm", sigma_min=0.01, sigma_max=10.0)
    assert float(custom.sigma(f64([0.5]))[0]) == pytest.approx(math.sqrt(0.01 * 10.0), rel=1e-12)


@pytest.mark.parametrize("name", CONTINUOUS)
def test_dtype_follows_input(name):
    s = make(name)
    for dtype in (torch.float32, torch.float64):
        t = torch.linspace(0, 1, 7, dtype=dtype)
        for fn in (s.alpha, s.sigma, s.dalpha, s.dsigma):
            assert fn(t).dtype == dtype
    assert s.num_timesteps is None


@pytest.mark.parametrize("name", CONTINUOUS)
def test_autograd_through_alpha_sigma(name):
    s = make(name)
    t = f64([0.3, 0.6]).requires_grad_(True)
    (s.alpha(t).sum() + s.sigma(t).sum()).backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()


# ---------------------------------------------------------------- derivatives


@pytest.mark.parametrize("name,kw", [("sigmoid", {}), ("sigmoid", dict(start=0.0, end=3.0, temperature=0.7)),
                                     ("rectified_flow", {}), ("edm", {})])
def test_derivatives_match_finite_differences(name, kw):
    s = make(name, **kw)
    t = f64([0.05, 0.2, 0.4, 0.5, 0.7, 0.95])
    h = 1e-6
    fd_a = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    fd_s = (s.sigma(t + h) - s.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(s.dalpha(t), fd_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.dsigma(t), fd_s, rtol=1e-6, atol=1e-6)
    da, ds = derivatives(s, t)  # the kernel picks up the analytic ones
    torch.testing.assert_close(da, s.dalpha(t), rtol=0, atol=0)
    torch.testing.assert_close(ds, s.dsigma(t), rtol=0, atol=0)


# ---------------------------------------------------------------- training times


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name,kw", [("sigmoid", {}), ("rectified_flow", {}),
                                     ("rectified_flow", dict(time_distribution="uniform")), ("edm", {})])
def test_sample_t_range_and_seeding(name, kw):
    s = make(name, **kw)
    t = s.sample_t(20000, generator=_gen(3))
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert float(t.min()) > 0 and float(t.max()) <= 1
    torch.testing.assert_close(t, s.sample_t(20000, generator=_gen(3)), rtol=0, atol=0)
    assert not torch.equal(t, s.sample_t(20000, generator=_gen(4)))
    assert s.sample_t(5, generator=_gen(0), device="cpu").device.type == "cpu"


def test_uniform_sample_t_moments():
    for name, kw in (("sigmoid", {}), ("rectified_flow", dict(time_distribution="uniform"))):
        t = make(name, **kw).sample_t(20000, generator=_gen(1)).double()
        assert abs(float(t.mean()) - 0.5) < 0.01 and abs(float(t.var()) - 1 / 12) < 0.003


@pytest.mark.parametrize("m,sd", [(0.0, 1.0), (0.5, 0.8), (-1.0, 1.5)])
def test_rectified_flow_logit_normal(m, sd):
    """Esser et al. (2024), Eq. 19: logit(t) ~ N(m, s²)."""
    s = make("rectified_flow", logit_mean=m, logit_std=sd)
    t = s.sample_t(20000, generator=_gen(2)).double()
    logit = torch.log(t) - torch.log1p(-t)
    assert abs(float(logit.mean()) - m) < 0.03 and abs(float(logit.std()) - sd) < 0.03
    assert abs(float(t.median()) - sig(m)) < 0.01
    for q, z in ((0.1, -1.2815515655446004), (0.9, 1.2815515655446004)):
        assert float(torch.quantile(t, q)) == pytest.approx(sig(m + sd * z), abs=0.01)


def test_rectified_flow_default_median():
    t = make("rectified_flow").sample_t(20000, generator=_gen(5))
    assert abs(float(t.median()) - 0.5) < 0.01


@pytest.mark.parametrize("kw", [{}, dict(p_mean=0.0, p_std=1.0)])
def test_edm_sample_t_log_sigma_distribution(kw):
    """Karras et al. (2022), Table 1: ln σ ~ N(P_mean, P_std²)."""
    s = make("edm", **kw)
    t = s.sample_t(20000, generator=_gen(6))
    log_sigma = torch.log(s.sigma(t.double()))
    assert abs(float(log_sigma.mean()) - kw.get("p_mean", -1.2)) < 0.03
    assert abs(float(log_sigma.std()) - kw.get("p_std", 1.2)) < 0.03


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("name,kw,match", [
    ("sigmoid", dict(start=3.0, end=-3.0), "start < end"),
    ("sigmoid", dict(start=1.0, end=1.0), "start < end"),
    ("sigmoid", dict(temperature=0.0), "temperature"),
    ("sigmoid", dict(temperature=-1.0), "temperature"),
    ("sigmoid", dict(start=float("nan")), "finite"),
    ("rectified_flow", dict(time_distribution="beta"), "time_distribution"),
    ("rectified_flow", dict(logit_std=0.0), "logit_std"),
    ("rectified_flow", dict(logit_mean=float("inf")), "logit_mean"),
    ("edm", dict(sigma_min=0.0), "sigma_min"),
    ("edm", dict(sigma_min=10.0, sigma_max=1.0), "sigma_min < sigma_max"),
    ("edm", dict(sigma_data=0.0), "sigma_data"),
    ("edm", dict(p_std=-1.0), "p_std"),
    ("edm", dict(sigma_max=float("inf")), "finite"),
    ("linear", dict(num_timesteps=1, zero_terminal_snr=True), "num_timesteps"),
    ("cosine", dict(num_timesteps=1, zero_terminal_snr=True), "num_timesteps"),
])
def test_invalid_args(name, kw, match):
    with pytest.raises(ConfigError, match=match):
        make(name, **kw)


# ---------------------------------------------------------------- zero terminal SNR


def ref_ztsnr_abar(abar: np.ndarray) -> np.ndarray:
    """Lin et al. (2024), Algorithm 1, in numpy."""
    r = np.sqrt(abar)
    r0, rT = r[0], r[-1]
    r = (r - rT) * r0 / (r0 - rT)
    return r**2


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 50, 2])
def test_zero_terminal_snr(name, T):
    plain = make(name, num_timesteps=T)
    zt = make(name, num_timesteps=T, zero_terminal_snr=True)
    assert float(zt.alpha(f64([1.0]))[0]) < 1e-5
    assert float(zt.sigma(f64([1.0]))[0]) == pytest.approx(1.0, abs=1e-12)
    snr1 = float(zt.alpha(f64([1.0]))[0]) ** 2 / float(zt.sigma(f64([1.0]))[0]) ** 2
    assert snr1 < 1e-10
    assert float(zt.betas[-1]) == 1.0 and bool(((zt.betas > 0) & (zt.betas <= 1)).all())
    # the first ᾱ is unchanged, the interior follows Algorithm 1
    assert float(zt.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-12)
    ref = ref_ztsnr_abar(plain.alphas_cumprod.numpy())
    np.testing.assert_allclose(zt.alphas_cumprod.numpy()[:-1], ref[:-1], rtol=1e-9, atol=1e-15)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    a, s = zt.alpha(t), zt.sigma(t)
    assert (a[1:] < a[:-1]).all() and (s[1:] > s[:-1]).all()
    assert float(a[0]) == 1.0 and float(s[0]) == 0.0
    # rescaling only lowers ᾱ
    assert (zt.alphas_cumprod <= plain.alphas_cumprod * (1 + 1e-12)).all()
    assert getattr(plain, "zero_terminal_snr", False) is False


def test_zero_terminal_snr_linear_matches_paper_table():
    """DDPM's linear schedule ends at √ᾱ_T ≈ 0.0064, not 0 (the flaw of Lin et al. 2024, Table 1);
    after rescaling it is zero up to the 1e-12 clamp on β_T."""
    plain = make("linear")
    assert float(plain.alphas_cumprod[-1].sqrt()) == pytest.approx(0.0064, abs=3e-4)
    zt = make("linear", zero_terminal_snr=True)
    assert float(zt.alphas_cumprod[-1].sqrt()) < 1e-8


# ---------------------------------------------------------------- sampling time grids


@pytest.mark.parametrize("name,kw", [("sigmoid", {}), ("rectified_flow", {}), ("edm", {}),
                                     ("linear", dict(zero_terminal_snr=True)),
                                     ("cosine", dict(zero_terminal_snr=True))])
@pytest.mark.parametrize("spacing", ["uniform", "logsnr", "karras"])
@pytest.mark.parametrize("steps", [1, 2, 18])
def test_sampling_times(name, kw, spacing, steps):
    s = make(name, **kw)
    ts = sampling_times(s, steps, spacing)
    assert ts.shape == (steps + 1,) and ts.dtype == torch.float64
    assert torch.isfinite(ts).all()
    assert float(ts[-1]) == 0.0 and float(ts[0]) <= 1.0
    assert (ts[1:] < ts[:-1]).all()
    assert torch.isfinite(s.alpha(ts)).all() and torch.isfinite(s.sigma(ts)).all()


def test_continuous_rejects_discrete_spacing():
    with pytest.raises(ConfigError, match="continuous"):
        sampling_times(make("edm"), 10, "leading")


def test_logsnr_grid_is_even_in_lambda():
    s = make("edm")
    ts = sampling_times(s, 10, "logsnr")[:-1]
    lam = log_snr(s, ts)
    steps = lam[1:] - lam[:-1]
    torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-6, atol=1e-6)
    assert float(lam[0]) == pytest.approx(-math.log(80.0), rel=1e-6)
    assert float(lam[-1]) == pytest.approx(-math.log(0.002), rel=1e-6)
