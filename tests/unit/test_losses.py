"""EDM preconditioning as a prediction target, loss weightings and offset noise."""

from __future__ import annotations

import math

import pytest
import torch

import unfog
from unfog.diffusion import (
    PREDICTIONS,
    derivatives,
    edm_coefficients,
    loss_weight,
    network_inputs,
    sigma_data_of,
    to_denoised,
    training_target,
    x0_weight,
)
from unfog.errors import ConfigError

B, D = 64, 6


def f64(values) -> torch.Tensor:  # noqa: ANN001
    return torch.tensor(values, dtype=torch.float64)


def draws(seed: int = 0, n: int = B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.randn(n, D, generator=g, dtype=torch.float64)


def path(name: str, n: int = B):
    """(schedule, t, α, σ, α', σ') over t ∈ [0.02, 0.98] for a registered schedule."""
    schedule = unfog.create("schedule", name)
    t = torch.linspace(0.02, 0.98, n, dtype=torch.float64)
    da, ds = derivatives(schedule, t)
    return schedule, t, schedule.alpha(t), schedule.sigma(t), da, ds


SCHEDULES = ["linear", "cosine", "edm", "rectified_flow", "sigmoid"]


def test_edm_coefficients_are_table_1_when_alpha_is_one():
    """Karras et al. (2022), Table 1, column "EDM", at σ_data = 0.5."""
    d = 0.5
    for sigma in (0.002, 0.1, 0.5, 3.0, 80.0):
        c_skip, c_out, c_in, c_noise = (float(v) for v in edm_coefficients(f64([1.0]), f64([sigma]), d))
        assert c_skip == pytest.approx(d * d / (sigma * sigma + d * d), rel=1e-12)
        assert c_out == pytest.approx(sigma * d / math.sqrt(sigma * sigma + d * d), rel=1e-12)
        assert c_in == pytest.approx(1 / math.sqrt(sigma * sigma + d * d), rel=1e-12)
        assert c_noise == pytest.approx(0.25 * math.log(sigma), rel=1e-12)
        # EDM's λ(σ) = (σ² + σ_d²)/(σ·σ_d)², and its effective weight λ·c_out² is 1.
        lam = float(x0_weight("edm", f64([1.0]), f64([sigma]), sigma_data=d))
        assert lam == pytest.approx((sigma**2 + d * d) / (sigma * d) ** 2, rel=1e-12)
        assert lam * c_out**2 == pytest.approx(1.0, rel=1e-12)


def test_edm_coefficients_on_a_scaled_path_equal_the_ve_ones_at_sigma_over_alpha():
    """Eq. (7) with s(t) = α: D(x) = c_skip(σ̃)·x/α + c_out(σ̃)·F(c_in(σ̃)·x/α), σ̃ = σ/α."""
    alpha, sigma = f64([0.8, 0.3, 0.05]), f64([0.6, 0.95, 0.999])
    vp = edm_coefficients(alpha, sigma, 0.5)
    ve = edm_coefficients(torch.ones(3, dtype=torch.float64), sigma / alpha, 0.5)
    torch.testing.assert_close(vp[0], ve[0] / alpha)  # c_skip folds in 1/α
    torch.testing.assert_close(vp[1], ve[1])
    torch.testing.assert_close(vp[2], ve[2] / alpha)  # so does c_in
    torch.testing.assert_close(vp[3], ve[3])


def test_edm_coefficients_are_finite_where_alpha_is_zero():
    c_skip, c_out, c_in, c_noise = edm_coefficients(f64([0.0]), f64([1.0]), 0.5)
    assert float(c_skip) == 0.0  # pure noise carries no signal: x̂₀ = c_out·F = σ_data·F
    assert float(c_out) == pytest.approx(0.5) and float(c_in) == pytest.approx(1.0)
    assert float(c_noise) == pytest.approx(10.0 / 4)  # ln(σ/α) clipped to 10


@pytest.mark.parametrize("name", SCHEDULES)
def test_edm_target_round_trips_on_every_path(name):
    _, _, alpha, sigma, _, _ = path(name)
    x0, eps = draws()
    x = alpha[:, None] * x0 + sigma[:, None] * eps
    target = training_target(x0, eps, alpha, sigma, "edm", sigma_data=0.7)
    d = to_denoised(target, x, alpha, sigma, "edm", sigma_data=0.7)
    torch.testing.assert_close(d.x0, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d.eps, eps, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", SCHEDULES)
def test_edm_network_input_and_target_have_unit_variance(name):
    """The point of the preconditioning (Karras et al. 2022, Appendix B.6): for data of
    standard deviation σ_data, the network's input and its target have unit variance at
    every noise level."""
    sd = 0.5
    _, t, alpha, sigma, _, _ = path(name, n=9)
    g = torch.Generator().manual_seed(3)
    x0 = sd * torch.randn(9, 40_000, generator=g, dtype=torch.float64)
    eps = torch.randn(9, 40_000, generator=g, dtype=torch.float64)
    x = alpha[:, None] * x0 + sigma[:, None] * eps
    x_in, t_in = network_inputs(x, t, alpha, sigma, "edm", sd)
    target = training_target(x0, eps, alpha, sigma, "edm", sigma_data=sd)
    torch.testing.assert_close(x_in.std(dim=1), torch.ones(9, dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close(target.std(dim=1), torch.ones(9, dtype=torch.float64), atol=0.02, rtol=0)
    assert bool((t_in.diff() > 0).all()), "c_noise must grow with the noise level"


def test_other_targets_leave_the_network_input_alone():
    x, t = torch.randn(3, 2), torch.rand(3)
    for prediction in ("eps", "x0", "v", "flow"):
        x_in, t_in = network_inputs(x, t, t, 1 - t, prediction)
        assert x_in is x and t_in is t


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("weighting", ["min_snr", "edm"])
def test_a_weighting_means_the_same_x0_weight_for_every_target(name, weighting):
    """For any estimate x̂₀, weight × MSE on the target equals the weighting's x₀ weight ×
    ‖x₀ − x̂₀‖², whatever the network predicts."""
    schedule, _, alpha, sigma, da, ds = path(name)
    x0, eps = draws(1)
    x = alpha[:, None] * x0 + sigma[:, None] * eps
    x0_hat = x0 + 0.1 * draws(2)[0]
    eps_hat = (x - alpha[:, None] * x0_hat) / sigma[:, None]
    snr = (alpha / sigma) ** 2
    wanted = snr.clamp(max=5.0) if weighting == "min_snr" else x0_weight("edm", alpha, sigma, sigma_data=0.5)
    expected = wanted * (x0 - x0_hat).square().mean(dim=1)
    for prediction in PREDICTIONS:
        if prediction == "eps" and float(alpha.min()) < 1e-3:
            continue
        out = training_target(x0_hat, eps_hat, alpha, sigma, prediction, da, ds, sigma_data=0.5)
        target = training_target(x0, eps, alpha, sigma, prediction, da, ds, sigma_data=0.5)
        w = loss_weight(weighting, prediction, alpha, sigma, gamma=5.0, d_alpha=da, d_sigma=ds, sigma_data=0.5)
        got = w.to(torch.float64) * (out - target).square().mean(dim=1)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-9, msg=f"{weighting} × {prediction}")


def test_min_snr_is_hang_et_al_for_eps_and_v():
    """Hang et al. (2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v (VP paths)."""
    _, _, alpha, sigma, _, _ = path("cosine")
    snr = (alpha / sigma) ** 2
    w_eps = loss_weight("min_snr", "eps", alpha, sigma, gamma=5.0).to(torch.float64)
    w_v = loss_weight("min_snr", "v", alpha, sigma, gamma=5.0).to(torch.float64)
    torch.testing.assert_close(w_eps, snr.clamp(max=5) / snr, rtol=1e-6, atol=0)
    torch.testing.assert_close(w_v, snr.clamp(max=5) / (snr + 1), rtol=1e-6, atol=0)
    assert float(w_eps.max()) == pytest.approx(1.0) and float(w_eps.min()) < 0.01


def test_uniform_is_the_plain_mse_and_edm_with_edm_target_is_uniform():
    _, _, alpha, sigma, _, _ = path("edm")
    assert loss_weight("uniform", "eps", alpha, sigma) is None
    w = loss_weight("edm", "edm", alpha, sigma, sigma_data=0.5)
    torch.testing.assert_close(w, torch.ones_like(w))


def test_unknown_weighting_and_bad_sigma_data_refused():
    alpha = sigma = f64([0.5])
    with pytest.raises(ConfigError, match="loss weighting 'snr'.*uniform, min_snr, edm"):
        loss_weight("snr", "eps", alpha, sigma)
    with pytest.raises(ConfigError, match="sigma_data must be positive"):
        sigma_data_of(None, 0.0)


def test_sigma_data_comes_from_config_then_schedule_then_default():
    edm = unfog.create("schedule", "edm", sigma_data=0.3)
    assert sigma_data_of(edm) == 0.3
    assert sigma_data_of(edm, 0.8) == 0.8
    assert sigma_data_of(unfog.create("schedule", "cosine")) == 0.5


def _module(**kw):  # noqa: ANN003, ANN202
    from unfog.model import DiffusionModel
    from unfog.training import DiffusionModule

    backbone = unfog.create("backbone", "unet", data_shape=(3, 8, 8), cond_dim=0, channels=8, channel_mult=[1],
                            num_res_blocks=1, attention_levels=[], groups=4)
    return DiffusionModule(DiffusionModel(backbone), unfog.create("schedule", "cosine"), **kw)


def test_offset_noise_shifts_each_channel_and_image_as_a_whole():
    """Guttenberg (2023): ε + k·η with one η per (sample, channel), shared by all positions."""
    torch.manual_seed(0)
    x0 = torch.zeros(4000, 3, 8, 8)
    plain = _module().noise_like(x0)
    offset = _module(offset_noise=0.5).noise_like(x0)
    # the spatial mean of plain noise has variance 1/64; the offset adds 0.5² = 0.25
    assert float(plain.mean(dim=(2, 3)).var()) == pytest.approx(1 / 64, rel=0.1)
    assert float(offset.mean(dim=(2, 3)).var()) == pytest.approx(1 / 64 + 0.25, rel=0.1)
    # within an image, the offset is a constant: deviations from the mean keep variance 1
    centred = offset - offset.mean(dim=(2, 3), keepdim=True)
    assert float(centred.var()) == pytest.approx(63 / 64, rel=0.05)


def test_offset_noise_on_data_without_positions_refused():
    module = _module(offset_noise=0.1)
    with pytest.raises(ValueError, match="offset_noise needs data with channels and positions"):
        module.noise_like(torch.zeros(8, 2))


@pytest.mark.parametrize("weighting", ["uniform", "min_snr", "edm"])
@pytest.mark.parametrize("prediction", ["eps", "edm"])
def test_weighted_losses_train(weighting, prediction):
    """Each weighting gives a finite loss with gradients for every parameter that is used."""
    torch.manual_seed(0)
    module = _module(prediction=prediction, loss_weighting=weighting, offset_noise=0.1)
    loss = module.loss({"x": torch.randn(8, 3, 8, 8) * 0.5})
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in module.model.parameters() if p.requires_grad]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
