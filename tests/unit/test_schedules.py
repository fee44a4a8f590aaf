"""The linear and cosine schedules and the sampling time grids, against the papers' numbers.

References are computed independently here (numpy / math, float64), never through the
schedule classes' own arithmetic.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import unfog
from unfog.errors import ConfigError
from unfog.timesteps import discrete_indices, sampling_times


def linear(T: int = 1000, **kw):
    return unfog.create("schedule", "linear", num_timesteps=T, **kw)


def cosine(T: int = 1000, **kw):
    return unfog.create("schedule", "cosine", num_timesteps=T, **kw)


def ref_linear_abar(T: int, b0: float = 1e-4, b1: float = 0.02) -> np.ndarray:
    betas = np.linspace(b0, b1, T, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def ref_cosine_f(t: float, s: float = 0.008) -> float:
    """Nichol & Dhariwal (2021), Eq. (17): f(t) = cos²((t/T + s)/(1 + s)·π/2)."""
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def f64(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------- linear


def test_linear_betas_match_ho_et_al():
    sch = linear(1000)
    assert sch.num_timesteps == 1000
    assert sch.betas.shape == (1000,)
    assert float(sch.betas[0]) == pytest.approx(1e-4, rel=1e-12)
    assert float(sch.betas[-1]) == pytest.approx(0.02, rel=1e-12)
    # linear: constant increments
    np.testing.assert_allclose(np.diff(sch.betas.numpy()), (0.02 - 1e-4) / 999, rtol=1e-9)


def test_linear_alpha_bar_matches_cumulative_product():
    sch = linear(1000)
    ref = ref_linear_abar(1000)
    np.testing.assert_allclose(sch.alphas_cumprod.numpy(), ref, rtol=1e-10)
    # ᾱ_T of the DDPM schedule is about 4.04e-5 (signal almost gone at t = 1)
    assert float(sch.alphas_cumprod[-1]) == pytest.approx(4.0358e-5, rel=1e-4)
    assert ref[-1] == pytest.approx(4.0358e-5, rel=1e-4)


@pytest.mark.parametrize("T", [1, 10, 1000])
def test_linear_grid_times_give_table_values(T):
    sch = linear(T)
    t = f64(np.arange(1, T + 1) / T)
    torch.testing.assert_close(sch.grid, t, rtol=0, atol=0)
    ref = ref_linear_abar(T)
    np.testing.assert_allclose(sch.alpha(t).numpy(), np.sqrt(ref), rtol=1e-12)
    np.testing.assert_allclose(sch.sigma(t).numpy(), np.sqrt(1 - ref), rtol=1e-10)
    assert sch.alpha(t).dtype == torch.float64


def test_configurable_T_changes_the_schedule():
    s10, s1000 = linear(10), linear(1000)
    assert s10.num_timesteps == 10 and s10.betas.shape == (10,)
    np.testing.assert_allclose(s10.betas.numpy(), np.linspace(1e-4, 0.02, 10), rtol=1e-12)
    # with only 10 steps of β ≤ 0.02 most of the signal survives
    assert float(s10.alphas_cumprod[-1]) == pytest.approx(ref_linear_abar(10)[-1], rel=1e-12)
    assert float(s10.alphas_cumprod[-1]) > 0.8 > float(s1000.alphas_cumprod[-1])
    custom = linear(50, beta_start=1e-3, beta_end=0.05)
    np.testing.assert_allclose(custom.alphas_cumprod.numpy(), ref_linear_abar(50, 1e-3, 0.05), rtol=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_variance_preserving_and_monotone_on_and_off_grid(name):
    sch = unfog.create("schedule", name, num_timesteps=100)
    t = torch.linspace(0, 1, 10_001, dtype=torch.float64)  # 100 points per grid cell
    a, s = sch.alpha(t), sch.sigma(t)
    torch.testing.assert_close(a * a + s * s, torch.ones_like(t), rtol=0, atol=1e-12)
    assert bool((a.diff() < 0).all()), "α must decrease strictly in t"
    assert bool((s.diff() > 0).all()), "σ must increase strictly in t"
    zero = torch.zeros(1, dtype=torch.float64)
    assert float(sch.alpha(zero)[0]) == 1.0
    assert float(sch.sigma(zero)[0]) == 0.0
    # float32 in, float32 out
    assert sch.alpha(t.float()).dtype == torch.float32


def test_log_alpha_bar_is_linear_between_grid_points():
    T = 10
    sch = linear(T)
    log_abar = np.concatenate([[0.0], np.log(ref_linear_abar(T))])
    for i in range(T):
        for w in (0.25, 0.5, 0.9):
            t = f64([(i + w) / T])
            expect = math.exp(0.5 * ((1 - w) * log_abar[i] + w * log_abar[i + 1]))
            assert float(sch.alpha(t)[0]) == pytest.approx(expect, rel=1e-12)


def test_sigma_is_accurate_near_zero():
    sch = linear(1000)
    # σ² at the first grid point is β_1 = 1e-4 exactly; a naive sqrt(1 - α²) loses digits
    t = f64([1 / 1000])
    assert float(sch.sigma(t)[0]) ** 2 == pytest.approx(1e-4, rel=1e-12)
    tiny = f64([1e-9])  # log ᾱ ≈ 1e-9 · T · log(1 - β₁)
    expect = math.sqrt(-math.expm1(1e-9 * 1000 * math.log1p(-1e-4)))
    assert float(sch.sigma(tiny)[0]) == pytest.approx(expect, rel=1e-9)


# --------------------------------------------------------------------------- cosine


@pytest.mark.parametrize("T", [10, 1000])
def test_cosine_alpha_bar_matches_eq17_where_unclipped(T):
    sch = cosine(T)
    f0 = ref_cosine_f(0.0)
    ref = np.array([ref_cosine_f(i / T) / f0 for i in range(1, T + 1)])
    abar = sch.alphas_cumprod.numpy()
    # every β but the last is below the clip, so ᾱ_i = f(i/T)/f(0) for i < T
    np.testing.assert_allclose(abar[:-1], ref[:-1], rtol=1e-10)
    assert bool((sch.betas[:-1] < 0.999).all())
    # f(1) = 0 would make β_T = 1; it is clipped to max_beta = 0.999
    assert float(sch.betas[-1]) == pytest.approx(0.999, rel=1e-12)
    assert abar[-1] == pytest.approx(abar[-2] * (1 - 0.999), rel=1e-9)
    assert abar[-1] > 0


def test_cosine_reference_values():
    sch = cosine(1000)
    t = f64([0.5])
    # ᾱ(0.5) = cos²(0.508/1.008·π/2) / cos²(0.008/1.008·π/2)
    assert float(sch.alpha(t)[0]) ** 2 == pytest.approx(0.49384359044, rel=1e-9)
    # s = 0.008 keeps β_1 from being tiny: β_1 ≈ 4e-5 for T = 1000
    b1 = 1 - ref_cosine_f(1e-3) / ref_cosine_f(0.0)
    assert float(sch.betas[0]) == pytest.approx(b1, rel=1e-9)
    assert 3e-5 < b1 < 5e-5


def test_cosine_custom_max_beta_and_offset():
    T, mb, s = 20, 0.3, 0.02
    sch = cosine(T, s=s, max_beta=mb)
    f = [ref_cosine_f(i / T, s) for i in range(T + 1)]
    betas = np.minimum([1 - f[i] / f[i - 1] for i in range(1, T + 1)], mb)
    assert (betas == mb).sum() >= 3  # the clip is active on several steps
    np.testing.assert_allclose(sch.betas.numpy(), betas, rtol=1e-10)
    np.testing.assert_allclose(sch.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-10)


# --------------------------------------------------------------------------- sample_t


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_sample_t_is_on_the_grid_and_covers_it(name):
    T = 10
    sch = unfog.create("schedule", name, num_timesteps=T)
    g = torch.Generator().manual_seed(0)
    t = sch.sample_t(20_000, generator=g)
    assert t.shape == (20_000,) and t.is_floating_point()
    i = torch.round(t.double() * T)
    torch.testing.assert_close(t.double() * T, i, rtol=0, atol=1e-5)
    assert int(i.min()) == 1 and int(i.max()) == T
    counts = torch.bincount(i.long(), minlength=T + 1)[1:]
    assert counts.sum() == 20_000
    # uniform: each of the 10 values ~2000 ± 42 times
    assert bool(((counts - 2000).abs() < 200).all()), counts


def test_sample_t_covers_large_T_and_respects_the_seed():
    sch = linear(1000)
    t1 = sch.sample_t(50_000, generator=torch.Generator().manual_seed(3))
    t2 = sch.sample_t(50_000, generator=torch.Generator().manual_seed(3))
    t3 = sch.sample_t(50_000, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(t1, t2, rtol=0, atol=0)
    assert not torch.equal(t1, t3)
    assert float(t1.min()) == pytest.approx(1e-3, rel=1e-6)
    assert float(t1.max()) == 1.0
    assert len(torch.unique(t1)) == 1000
    assert float(t1.mean()) == pytest.approx(0.5005, abs=0.005)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_timesteps=0),
        dict(num_timesteps=-5),
        dict(beta_start=0.02, beta_end=1e-4),
        dict(beta_start=0.0),
        dict(beta_start=-1e-4),
        dict(beta_end=1.0),
    ],
)
def test_linear_invalid_args(kwargs):
    with pytest.raises(ConfigError):
        unfog.create("schedule", "linear", **kwargs)


@pytest.mark.parametrize("kwargs", [dict(num_timesteps=0), dict(max_beta=0.0), dict(max_beta=1.5)])
def test_cosine_invalid_args(kwargs):
    with pytest.raises(ConfigError):
        unfog.create("schedule", "cosine", **kwargs)


# --------------------------------------------------------------------------- spacings


def test_spacings_lin_et_al_table2_T1000_S10():
    # Lin et al. (2024), Table 2, shifted from 0-based to 1-based indices.
    lead = discrete_indices(1000, 10, "leading").tolist()
    assert lead == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    trail = discrete_indices(1000, 10, "trailing").tolist()
    assert trail == [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]
    lin = discrete_indices(1000, 10, "linspace").tolist()
    assert lin == [1000, 889, 778, 667, 556, 445, 334, 223, 112, 1]
    assert lin == sorted(np.round(np.linspace(1, 1000, 10)).astype(int).tolist(), reverse=True)


def test_spacings_when_S_does_not_divide_T():
    # diffusers, T = 1000, S = 3: leading 0, 333, 666; trailing round(1000, 666.7, 333.3) - 1
    assert discrete_indices(1000, 3, "leading").tolist() == [667, 334, 1]
    assert discrete_indices(1000, 3, "trailing").tolist() == [1000, 667, 333]
    assert discrete_indices(1000, 3, "linspace").tolist() == [1000, 500, 1]  # 500.5 rounds to even


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_spacings_all_steps_and_one_step(spacing):
    full = discrete_indices(50, 50, spacing)
    assert full.tolist() == list(range(50, 0, -1))
    one = discrete_indices(50, 1, spacing).tolist()
    assert len(one) == 1 and 1 <= one[0] <= 50
    for S in (7, 13, 49):
        idx = discrete_indices(50, S, spacing)
        assert len(idx) == S and len(set(idx.tolist())) == S
        assert bool((idx.diff() < 0).all()) and 1 <= int(idx.min()) and int(idx.max()) <= 50


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_steps_out_of_range(steps):
    with pytest.raises(ConfigError):
        discrete_indices(1000, steps, "leading")


def test_unknown_spacing():
    with pytest.raises(ConfigError):
        discrete_indices(1000, 10, "quadratic")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_sampling_times_end_with_zero(spacing):
    sch = linear(1000)
    times = sampling_times(sch, 10, spacing)
    assert times.dtype == torch.float64 and len(times) == 11
    assert float(times[-1]) == 0.0
    torch.testing.assert_close(times[:-1], discrete_indices(1000, 10, spacing).double() / 1000)
    assert bool((times.diff() < 0).all())
    with pytest.raises(ConfigError):
        sampling_times(sch, 1001, spacing)


def test_sampling_times_continuous_schedule():
    cont = SimpleNamespace(num_timesteps=None)
    times = sampling_times(cont, 4)
    torch.testing.assert_close(times, f64([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ConfigError):
        sampling_times(cont, 0)
