"""Every sampler × every schedule × every prediction target works, or is refused up front.

The model is the exact denoiser of Gaussian data N(μ, s²), expressed in each target, so a
working combination must land on that distribution.
"""

from __future__ import annotations

import pytest
import torch

import unfog
from unfog.building import check_schedule_and_prediction
from unfog.diffusion import (
    PREDICTIONS,
    Denoiser,
    SeededNoise,
    derivatives,
    edm_coefficients,
    expand,
    training_target,
)
from unfog.errors import ConfigError
from unfog.timesteps import time_at_log_snr

MU, STD = 1.5, 0.5
SIGMA_DATA = 0.5
N = 4000
STEPS = {"ddpm": 100, "euler_ancestral": 100}  # ancestral samplers need more steps than ODE solvers here


def exact_model(schedule, prediction: str):  # noqa: ANN001, ANN201
    """The posterior mean E[x₀ | x_t] for N(μ, s²) data, written as ``prediction``.

    For ``edm`` the network is called with EDM's (c_in·x, c_noise), so the model reads x and
    t back from them: σ/α = exp(4·c_noise) gives t, and x = input / c_in(t).
    """

    def model(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:  # noqa: ANN001
        t64 = t.to(torch.float64)
        if prediction == "edm":
            t64 = time_at_log_snr(schedule, -4 * t64)
            a, s = schedule.alpha(t64), schedule.sigma(t64)
            x = x / expand(edm_coefficients(a, s, SIGMA_DATA)[2], x)
        a, s = schedule.alpha(t64), schedule.sigma(t64)
        ae, se = expand(a, x), expand(s, x)
        x0 = MU + ae * STD**2 / (ae**2 * STD**2 + se**2) * (x - ae * MU)
        eps = torch.where(se > 0, (x - ae * x0) / se.clamp_min(1e-300), torch.zeros_like(x))
        d = derivatives(schedule, t64) if prediction == "flow" else (None, None)
        return training_target(x0, eps, a, s, prediction, *d, sigma_data=SIGMA_DATA)

    return model


def _cases() -> list[tuple[str, str, str]]:
    return [(sm, sc, p) for sm in unfog.available("sampler") for sc in unfog.available("schedule") for p in PREDICTIONS]


@pytest.mark.parametrize(("sampler", "schedule_name", "prediction"), _cases())
def test_combination_works_or_is_refused(sampler: str, schedule_name: str, prediction: str) -> None:
    schedule = unfog.create("schedule", schedule_name)
    try:
        check_schedule_and_prediction(schedule, prediction)
    except ConfigError as exc:
        assert "prediction" in str(exc)
        return
    kwargs = {"steps": STEPS.get(sampler, 40)}
    if schedule.num_timesteps is None:
        kwargs["spacing"] = "karras" if sampler != "ddpm" else "logsnr"
    den = Denoiser(exact_model(schedule, prediction), schedule, prediction, sigma_data=SIGMA_DATA)
    rng = SeededNoise.for_indices(0, range(4))
    scale = float(schedule.sigma(torch.tensor([1.0], dtype=torch.float64))[0])
    noise = scale * rng.randn_like(torch.empty(4, N // 4, dtype=torch.float64))
    out = unfog.create("sampler", sampler, **kwargs).sample(den, noise, rng)
    assert torch.isfinite(out).all(), f"{sampler} × {schedule_name} × {prediction} gave non-finite samples"
    assert abs(float(out.mean()) - MU) < 0.05 and abs(float(out.std()) - STD) < 0.05, (
        f"{sampler} × {schedule_name} × {prediction}: mean {float(out.mean()):.3f}, std {float(out.std()):.3f}")
