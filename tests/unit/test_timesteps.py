"""Continuous time grids (uniform, log-SNR, Karras) and the flow-velocity target."""

from __future__ import annotations

import math

import pytest
import torch

import unfog
from unfog.diffusion import derivatives, to_denoised, training_target
from unfog.errors import ConfigError
from unfog.timesteps import KARRAS_RHO, log_snr, sampling_times, time_at_log_snr


class RectifiedFlow:
    """α = 1 − t, σ = t: a continuous schedule that reaches α = 0 and σ = 0 exactly."""

    num_timesteps = None

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - t

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sample_t(self, n: int, *, generator=None, device=None) -> torch.Tensor:  # noqa: ANN001
        return torch.rand(n, generator=generator)


@pytest.fixture(params=["cosine", "rf"])
def schedule(request: pytest.FixtureRequest):
    return unfog.create("schedule", "cosine") if request.param == "cosine" else RectifiedFlow()


def test_time_at_log_snr_inverts_log_snr(schedule) -> None:  # noqa: ANN001
    t = torch.tensor([0.05, 0.3, 0.7, 0.95], dtype=torch.float64)
    torch.testing.assert_close(time_at_log_snr(schedule, log_snr(schedule, t)), t, atol=1e-9, rtol=0)


@pytest.mark.parametrize("spacing", ["uniform", "logsnr", "karras"])
def test_continuous_spacings_are_descending_finite_and_end_at_zero(schedule, spacing: str) -> None:  # noqa: ANN001
    times = sampling_times(schedule, 12, spacing)
    assert len(times) == 13 and float(times[-1]) == 0.0
    assert torch.isfinite(times).all() and (times[1:] < times[:-1]).all() and float(times[0]) <= 1.0


def test_logsnr_spacing_is_uniform_in_lambda(schedule) -> None:  # noqa: ANN001
    lam = log_snr(schedule, sampling_times(schedule, 10, "logsnr")[:-1])
    steps = lam[1:] - lam[:-1]
    torch.testing.assert_close(steps, steps.mean().expand_as(steps), atol=1e-6, rtol=0)


def test_karras_spacing_follows_rho_ramp_in_sigma_over_alpha() -> None:
    schedule = RectifiedFlow()
    sig = torch.exp(-log_snr(schedule, sampling_times(schedule, 8, "karras")[:-1]))  # σ/α
    ramp = sig ** (1 / KARRAS_RHO)
    torch.testing.assert_close(ramp[1:] - ramp[:-1], (ramp[1] - ramp[0]).expand(7), atol=1e-6, rtol=0)
    assert math.isclose(float(sig[0]), 80.0, rel_tol=1e-6)  # σ/α capped at 80 where α(1) = 0
    assert math.isclose(float(sig[-1]), 0.002, rel_tol=1e-6)  # and floored at 0.002 where σ(0) = 0


def test_discrete_spacing_on_a_continuous_schedule_is_refused() -> None:
    with pytest.raises(ConfigError, match="continuous"):
        sampling_times(RectifiedFlow(), 10, "leading")


def test_default_spacing_depends_on_the_schedule() -> None:
    discrete = unfog.create("schedule", "linear", num_timesteps=100)
    torch.testing.assert_close(sampling_times(discrete, 4), sampling_times(discrete, 4, "leading"))
    torch.testing.assert_close(sampling_times(RectifiedFlow(), 4), torch.linspace(1, 0, 5, dtype=torch.float64))


def test_flow_target_round_trips_and_is_eps_minus_x0_for_rectified_flow() -> None:
    schedule, t = RectifiedFlow(), torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    x0, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    a, s = schedule.alpha(t), schedule.sigma(t)
    da, ds = derivatives(schedule, t)
    u = training_target(x0, eps, a, s, "flow", da, ds)
    torch.testing.assert_close(u, eps - x0)
    d = to_denoised(u, a[:, None] * x0 + s[:, None] * eps, a, s, "flow", da, ds)
    torch.testing.assert_close(d.x0, x0)
    torch.testing.assert_close(d.eps, eps)


def test_derivatives_by_autograd_match_finite_differences() -> None:
    schedule = unfog.create("schedule", "cosine", num_timesteps=1000)
    t = torch.tensor([0.2, 0.55], dtype=torch.float64)
    da, ds = derivatives(schedule, t)
    h = 1e-3  # one grid cell: the discrete schedule is piecewise linear in log ᾱ
    fd_a = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    fd_s = (schedule.sigma(t + h) - schedule.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(da, fd_a, rtol=2e-2, atol=0)
    torch.testing.assert_close(ds, fd_s, rtol=2e-2, atol=0)
