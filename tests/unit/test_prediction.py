"""Prediction targets, their conversions, the Denoiser (guidance, clipping) and SeededNoise."""

from __future__ import annotations

import pytest
import torch

import unfog
from unfog.diffusion import Denoiser, SeededNoise, expand, to_denoised, training_target
from unfog.errors import ConfigError

B, D = 16, 5


def draws(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, D, generator=g, dtype=torch.float64) * 2 + 0.3
    eps = torch.randn(B, D, generator=g, dtype=torch.float64)
    return x0, eps


def schedule_pairs():
    """(α, σ) per sample from a real schedule, spanning t from 1/T to 1, plus a non-VP pair."""
    sch = unfog.create("schedule", "cosine", num_timesteps=1000)
    t = torch.linspace(1e-3, 1, B, dtype=torch.float64)
    yield "cosine", sch.alpha(t), sch.sigma(t)
    sch = unfog.create("schedule", "linear", num_timesteps=1000)
    yield "linear", sch.alpha(t), sch.sigma(t)
    # a variance-exploding-like pair: α² + σ² ≠ 1 tests the general 2x2 inversion
    yield "nonvp", torch.full((B,), 0.7, dtype=torch.float64), torch.full((B,), 1.3, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    yield (
        "random",
        torch.rand(B, generator=g, dtype=torch.float64) * 3 + 0.05,
        torch.rand(B, generator=g, dtype=torch.float64) * 3 + 0.05,
    )


PAIRS = list(schedule_pairs())


@pytest.mark.parametrize("pair", PAIRS, ids=[p[0] for p in PAIRS])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_target_round_trip(pair, prediction):
    _, alpha, sigma = pair
    x0, eps = draws()
    a, s = alpha[:, None], sigma[:, None]
    x = a * x0 + s * eps
    target = training_target(x0, eps, alpha, sigma, prediction)
    expected = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction]
    torch.testing.assert_close(target, expected, rtol=1e-14, atol=1e-14)
    d = to_denoised(target, x, alpha, sigma, prediction)
    # σ ≥ 0.01 and α ≥ 6e-3 on these pairs; errors ~1e-16 / min(α, σ)
    torch.testing.assert_close(d.x0, x0, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(d.eps, eps, rtol=1e-11, atol=1e-11)


def test_v_is_the_rotation_of_salimans_and_ho():
    # with α = cos φ, σ = sin φ: v = cos φ·ε − sin φ·x₀ and x = cos φ·x₀ + sin φ·ε, so
    # (x, v) is (x₀, ε) rotated by φ, and norms are preserved
    phi = torch.linspace(0.05, 1.5, B, dtype=torch.float64)
    x0, eps = draws(2)
    alpha, sigma = phi.cos(), phi.sin()
    x = alpha[:, None] * x0 + sigma[:, None] * eps
    v = training_target(x0, eps, alpha, sigma, "v")
    torch.testing.assert_close(x.square() + v.square(), x0.square() + eps.square())


def test_conversions_broadcast_over_image_shapes():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    alpha = torch.tensor([0.9, 0.5, 0.2, 0.05], dtype=torch.float64)
    sigma = (1 - alpha**2).sqrt()
    x = expand(alpha, x0) * x0 + expand(sigma, x0) * eps
    for p in ("eps", "x0", "v"):
        d = to_denoised(training_target(x0, eps, alpha, sigma, p), x, alpha, sigma, p)
        torch.testing.assert_close(d.x0, x0, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(d.eps, eps, rtol=1e-11, atol=1e-11)


def test_unknown_prediction_raises():
    x0, eps = draws()
    a = torch.ones(B, dtype=torch.float64)
    with pytest.raises(ConfigError):
        training_target(x0, eps, a, a, "score")
    with pytest.raises(ConfigError):
        to_denoised(x0, x0, a, a, "score")
    sch = unfog.create("schedule", "linear", num_timesteps=10)
    with pytest.raises(ConfigError):
        Denoiser(lambda x, t, c: x, sch, prediction="score")


# --------------------------------------------------------------------------- Denoiser


class FakeModel:
    """out = cond["vector"] + 0.1·x + t; records every call."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def __call__(self, x, t, cond):
        self.calls.append((x.clone(), t.clone(), dict(cond)))
        out = 0.1 * x + t[:, None].to(x.dtype)
        if "vector" in cond:
            out = out + cond["vector"]
        return out


def test_denoiser_guidance_is_one_batched_forward():
    sch = unfog.create("schedule", "linear", num_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    c = torch.randn(B, D, generator=g, dtype=torch.float64)
    u = torch.zeros(B, D, dtype=torch.float64) - 0.5
    model = FakeModel()
    guidance = 3.0
    den = Denoiser(model, sch, prediction="eps", cond={"vector": c}, uncond={"vector": u}, guidance=guidance)
    d = den(x, 0.4)
    assert len(model.calls) == 1 and den.nfe == 1
    xin, tin, cin = model.calls[0]
    assert xin.shape == (2 * B, D) and tin.shape == (2 * B,) and cin["vector"].shape == (2 * B, D)
    torch.testing.assert_close(xin, torch.cat([x, x]), rtol=0, atol=0)
    torch.testing.assert_close(cin["vector"], torch.cat([u, c]), rtol=0, atol=0)
    assert torch.allclose(tin, torch.full((2 * B,), 0.4))
    out_c = 0.1 * x + 0.4 + c
    out_u = 0.1 * x + 0.4 + u
    expected = out_u + guidance * (out_c - out_u)
    torch.testing.assert_close(d.eps, expected, rtol=1e-6, atol=1e-6)
    # sanity: guided result differs from both branches
    assert not torch.allclose(d.eps, out_c, atol=1e-3) and not torch.allclose(d.eps, out_u, atol=1e-3)
    # x0 is consistent with the guided eps
    t = torch.full((B,), 0.4)
    a, s = sch.alpha(t).double()[:, None], sch.sigma(t).double()[:, None]
    torch.testing.assert_close(a * d.x0 + s * d.eps, x, rtol=1e-9, atol=1e-9)
    den(x, 0.2)
    assert len(model.calls) == 2 and den.nfe == 2


def test_nested_guidance_mixes_levels_in_one_forward():
    """Two conditioners with their own scales: o₀ + g₁(o₁ − o₀) + g₂(o₂ − o₁) (InstructPix2Pix's
    form), all three levels in one batched forward; equal scales reduce to plain guidance."""
    sch = unfog.create("schedule", "linear", num_timesteps=1000)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    lv = [{"vector": torch.randn(B, D, generator=g, dtype=torch.float64)} for _ in range(3)]
    model = FakeModel()
    den = Denoiser(model, sch, "x0", cond=lv[2], uncond=lv[:2], guidance=[2.0, 4.0])
    d = den(x, 0.3)
    assert len(model.calls) == 1 and model.calls[0][0].shape == (3 * B, D) and den.nfe == 1
    o = [0.1 * x + 0.3 + lv[k]["vector"] for k in range(3)]
    torch.testing.assert_close(d.x0, o[0] + 2.0 * (o[1] - o[0]) + 4.0 * (o[2] - o[1]))
    same = Denoiser(FakeModel(), sch, "x0", cond=lv[2], uncond=lv[:2], guidance=[3.0, 3.0])(x, 0.3)
    torch.testing.assert_close(same.x0, o[0] + 3.0 * (o[2] - o[0]))
    with pytest.raises(ValueError, match="2 guidance scales for 1"):
        Denoiser(FakeModel(), sch, "x0", cond=lv[2], uncond=lv[:1], guidance=[2.0, 3.0])


def test_guidance_rescale_matches_the_conditional_std():
    """φ = 1 gives the guided output rescaled to the conditional output's per-sample std
    (Lin et al. 2024, Eq. 15); φ = 0 is plain guidance; φ in between mixes linearly."""
    sch = unfog.create("schedule", "linear", num_timesteps=1000)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    c, u = ({"vector": torch.randn(B, D, generator=g, dtype=torch.float64)} for _ in range(2))
    outs = {phi: Denoiser(FakeModel(), sch, "x0", c, u, 5.0, rescale=phi)(x, 0.5).x0 for phi in (0.0, 0.7, 1.0)}
    cond_out = 0.1 * x + 0.5 + c["vector"]
    plain_cfg = (0.1 * x + 0.5 + u["vector"]) * (1 - 5.0) + 5.0 * cond_out
    torch.testing.assert_close(outs[0.0], plain_cfg)
    torch.testing.assert_close(outs[1.0].std(dim=1), cond_out.std(dim=1))
    torch.testing.assert_close(outs[1.0], plain_cfg * cond_out.std(dim=1, keepdim=True) / plain_cfg.std(dim=1, keepdim=True))
    torch.testing.assert_close(outs[0.7], 0.7 * outs[1.0] + 0.3 * outs[0.0])
    with pytest.raises(ConfigError, match="guidance_rescale"):
        Denoiser(FakeModel(), sch, "x0", c, u, 5.0, rescale=1.5)


def test_guidance_interval_guides_only_inside_and_skips_the_unconditional_pass_outside():
    """Kynkäänniemi et al. 2024: guidance only where σ/α lies in (lo, hi]; elsewhere the
    conditional output, from a forward of the conditional rows alone."""
    sch = unfog.create("schedule", "linear", num_timesteps=1000)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    c, u = ({"vector": torch.randn(B, D, generator=g, dtype=torch.float64)} for _ in range(2))
    t = torch.linspace(0.05, 0.95, B)
    level = sch.sigma(t) / sch.alpha(t)
    lo, hi = float(level[3]), float(level[7])  # rows 4..7 are inside (lo, hi]
    model = FakeModel()
    den = Denoiser(model, sch, "x0", c, u, 3.0, interval=(lo, hi))
    d = den(x, t)
    o_c, o_u = (0.1 * x + t[:, None].double() + v["vector"] for v in (c, u))
    inside = ((level > lo) & (level <= hi))[:, None]
    assert int(inside.sum()) == 4
    torch.testing.assert_close(d.x0, torch.where(inside, o_u + 3.0 * (o_c - o_u), o_c))
    model.calls.clear()
    den(x, torch.full((B,), 0.01))  # every row below lo: one forward of B rows
    assert model.calls[0][0].shape == (B, D)
    with pytest.raises(ConfigError, match="guidance_interval"):
        Denoiser(FakeModel(), sch, "x0", c, u, 3.0, interval=(2.0, 1.0))


def test_denoiser_without_guidance_passes_cond_through():
    sch = unfog.create("schedule", "linear", num_timesteps=1000)
    x = torch.randn(B, D, dtype=torch.float64)
    c = torch.randn(B, D, dtype=torch.float64)
    model = FakeModel()
    den = Denoiser(model, sch, prediction="x0", cond={"vector": c})
    t = torch.linspace(0.1, 1, B)
    d = den(x, t)
    assert len(model.calls) == 1 and model.calls[0][0].shape == (B, D)
    torch.testing.assert_close(model.calls[0][1], t)
    torch.testing.assert_close(d.x0, 0.1 * x + t[:, None].double() + c, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(cond={}),
        dict(uncond={"vector": torch.zeros(1, 2)}),
        dict(cond={"vector": torch.zeros(1, 2)}),
    ],
)
def test_guidance_without_conditioning_raises(kwargs):
    sch = unfog.create("schedule", "linear", num_timesteps=10)
    with pytest.raises(ConfigError):
        Denoiser(FakeModel(), sch, guidance=2.0, **kwargs)
    Denoiser(FakeModel(), sch, guidance=1.0, **kwargs)  # g = 1 needs nothing


def test_clip_clamps_x0_and_recomputes_eps():
    sch = unfog.create("schedule", "cosine", num_timesteps=1000)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * 3

    def model(x, t, cond):
        return 2.5 * x  # an x0 prediction far outside [-1, 1]

    t = torch.linspace(0.05, 0.95, B)
    raw = Denoiser(model, sch, prediction="x0")(x, t)
    assert float(raw.x0.abs().max()) > 1.5
    d = Denoiser(model, sch, prediction="x0", clip=(-1.0, 1.0))(x, t)
    assert float(d.x0.min()) >= -1.0 and float(d.x0.max()) <= 1.0
    torch.testing.assert_close(d.x0, (2.5 * x).clamp(-1, 1), rtol=0, atol=0)
    a, s = sch.alpha(t).double()[:, None], sch.sigma(t).double()[:, None]
    torch.testing.assert_close(a * d.x0 + s * d.eps, x, rtol=1e-9, atol=1e-9)
    clipped = (2.5 * x).abs() > 1
    assert bool(clipped.any())
    assert not torch.allclose(d.eps[clipped], raw.eps[clipped])  # eps really was recomputed
    torch.testing.assert_close(d.eps[~clipped], raw.eps[~clipped], rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- SeededNoise


def test_seeded_noise_independent_of_batch():
    shape = (3, 4)
    batch = SeededNoise.for_indices(7, range(8)).randn_like(torch.zeros(8, *shape))
    for k in (0, 5, 7):
        alone = SeededNoise.for_indices(7, [k]).randn_like(torch.zeros(1, *shape))
        torch.testing.assert_close(alone[0], batch[k], rtol=0, atol=0)
    # a shifted shard of the same run reproduces the same rows
    shard = SeededNoise.for_indices(7, [4, 5, 6, 7]).randn_like(torch.zeros(4, *shape))
    torch.testing.assert_close(shard, batch[4:], rtol=0, atol=0)
    # rows are different streams; another seed gives other noise
    assert not torch.equal(batch[0], batch[1])
    other = SeededNoise.for_indices(8, range(8)).randn_like(torch.zeros(8, *shape))
    assert not torch.equal(other, batch)


def test_seeded_noise_streams_advance_and_follow_dtype():
    noise = SeededNoise.for_indices(0, range(2))
    first = noise.randn_like(torch.zeros(2, 100, dtype=torch.float64))
    second = noise.randn_like(torch.zeros(2, 100, dtype=torch.float64))
    assert first.dtype == torch.float64
    assert not torch.equal(first, second)
    assert abs(float(first.mean())) < 0.3 and 0.8 < float(first.std()) < 1.2
    with pytest.raises(ValueError):
        noise.randn_like(torch.zeros(3, 100))
