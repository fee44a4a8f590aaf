"""Unit tests of the first-party backbones ``mlp`` and ``unet``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import unfog
from unfog.errors import ConfigError
from unfog_backbones.embeddings import sinusoidal_embedding

TINY_UNET: dict[str, Any] = dict(
    channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, groups=8
)
TINY_MLP: dict[str, Any] = dict(hidden=32, depth=2, time_dim=16)
DIGITS = (1, 8, 8)
COND_DIM = 6


def unet(cond_dim: int = 0, data_shape: tuple[int, ...] = DIGITS, **kw: Any) -> nn.Module:
    return unfog.create("backbone", "unet", data_shape=data_shape, cond_dim=cond_dim, **{**TINY_UNET, **kw})


def mlp(cond_dim: int = 0, **kw: Any) -> nn.Module:
    return unfog.create("backbone", "mlp", data_shape=(2,), cond_dim=cond_dim, **{**TINY_MLP, **kw})


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Add noise to every parameter so that zero-initialized layers no longer block anything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def inputs(shape: tuple[int, ...], cond_dim: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=gen)
    t = torch.rand(n, generator=gen)
    cond = {"vector": torch.randn(n, cond_dim, generator=gen)} if cond_dim else {}
    return x, t, cond


CASES = [
    pytest.param(unet, DIGITS, id="unet"),
    pytest.param(mlp, (2,), id="mlp"),
]


def test_unet_cifar10_has_the_ddpm_parameter_count() -> None:
    model = unfog.create(
        "backbone",
        "unet",
        data_shape=(3, 32, 32),
        cond_dim=0,
        channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
    )
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 1) == 35.7
    assert abs(n - 35_746_307) / 35_746_307 < 1e-3


def test_registered_with_class_attributes() -> None:
    assert {"mlp", "unet"} <= set(unfog.available("backbone"))
    assert unfog.get("backbone", "unet").obj.data_ranks == (3,)
    assert unfog.get("backbone", "mlp").obj.data_ranks == (1,)
    assert unfog.get("backbone", "mlp").obj.routes == ("vector", "tokens", "concat")
    assert unfog.get("backbone", "unet").obj.routes == ("vector", "tokens", "concat")
    for name in ("mlp", "unet"):
        assert "20" in unfog.get("backbone", name).summary  # cites a paper's year


@pytest.mark.parametrize("build, shape", CASES)
@pytest.mark.parametrize("cond_dim", [0, COND_DIM])
def test_output_shape_equals_input_shape(build, shape, cond_dim: int) -> None:
    model = build(cond_dim)
    x, t, cond = inputs(shape, cond_dim)
    assert model(x, t, cond).shape == x.shape


@pytest.mark.parametrize(
    "kw",
    [
        dict(use_scale_shift_norm=True),
        dict(resblock_updown=True),
        dict(channels=8, channel_mult=(2, 3)),
        dict(use_scale_shift_norm=True, resblock_updown=True, num_heads=2, channel_mult=(1, 2, 2)),
    ],
)
def test_unet_adm_options(kw: dict[str, Any]) -> None:
    model = unet(**{"data_shape": (3, 16, 8), "attention_resolutions": (8,), **kw})
    x, t, cond = inputs((3, 16, 8), 0)
    assert model(x, t, cond).shape == x.shape


@pytest.mark.parametrize("build, shape", CASES)
def test_output_layer_starts_at_zero(build, shape) -> None:
    x, t, cond = inputs(shape, 0)
    assert torch.all(build()(x, t, cond) == 0)


@pytest.mark.parametrize("build, shape", CASES)
def test_conditioning_changes_the_output(build, shape) -> None:
    model = perturb(build(COND_DIM)).eval()
    x, t, cond = inputs(shape, COND_DIM)
    other = {"vector": cond["vector"] + 1.0}
    assert not torch.allclose(model(x, t, cond), model(x, t, other))


@pytest.mark.parametrize("build, shape", CASES)
def test_time_changes_the_output(build, shape) -> None:
    model = perturb(build()).eval()
    x, t, cond = inputs(shape, 0)
    assert not torch.allclose(model(x, t, cond), model(x, 1.0 - t, cond))


@pytest.mark.parametrize("build, shape", CASES)
def test_missing_vector_condition_raises(build, shape) -> None:
    model = build(COND_DIM)
    x, t, _ = inputs(shape, 0)
    with pytest.raises(ConfigError, match="cond_dim=6.*'vector'"):
        model(x, t, {})


@pytest.mark.parametrize("build, shape", CASES)
def test_unexpected_or_misshaped_vector_condition_raises(build, shape) -> None:
    x, t, _ = inputs(shape, 0)
    with pytest.raises(ConfigError, match="unconditional"):
        build(0)(x, t, {"vector": torch.zeros(4, COND_DIM)})
    with pytest.raises(ConfigError, match=r"shape \(B, 6\)"):
        build(COND_DIM)(x, t, {"vector": torch.zeros(4, COND_DIM + 1)})


@pytest.mark.parametrize("build, shape", CASES)
@pytest.mark.parametrize("cond_dim", [0, COND_DIM])
def test_every_parameter_gets_a_gradient(build, shape, cond_dim: int) -> None:
    model = perturb(build(cond_dim, dropout=0.1))
    x, t, cond = inputs(shape, cond_dim)
    model(x, t, cond).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_unet_adm_options_use_every_parameter() -> None:
    model = perturb(unet(COND_DIM, use_scale_shift_norm=True, resblock_updown=True))
    x, t, cond = inputs(DIGITS, COND_DIM)
    model(x, t, cond).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_time_is_embedded_at_the_ddpm_step_scale() -> None:
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    emb = sinusoidal_embedding(t, 8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    assert torch.allclose(emb[:, 0], torch.sin(1000 * t.float()))  # the fastest frequency is 1
    assert torch.allclose(emb[:, 4], torch.cos(1000 * t.float()))
    assert sinusoidal_embedding(t, 7).shape == (3, 7)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(data_shape=(64,)), "data_shape must be an image shape"),
        (dict(data_shape=(1, 12, 12), channel_mult=(1, 2, 2, 2)), "divisible by 2\\*\\*\\(len"),
        (dict(attention_resolutions=(16,)), "never reach"),
        (dict(channels=20), "divisible by groups=8"),
        (dict(num_heads=3), "num_heads=3"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(dropout=1.5), "dropout"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(cond_dim=-1), "cond_dim"),
    ],
)
def test_invalid_unet_configurations_raise(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        unet(**kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(data_shape=(1, 8, 8)), "data_shape must be one positive size"),
        (dict(depth=0), "depth"),
        (dict(time_dim=1), "time_dim"),
        (dict(dropout=-0.1), "dropout"),
    ],
)
def test_invalid_mlp_configurations_raise(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        unfog.create("backbone", "mlp", **{"data_shape": (2,), **TINY_MLP, **kw})


def test_coord_channels_tell_interior_pixels_apart() -> None:
    """A small-receptive-field U-Net maps a constant image to a constant interior; with the
    coordinates stacked onto the input each pixel knows where it is."""
    kw = dict(data_shape=(1, 32, 32), channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
              groups=4, dropout=0.0)
    outs = {}
    for coords in (False, True):
        torch.manual_seed(0)
        net = unfog.create("backbone", "unet", coord_channels=coords, **kw)
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.2)
        with torch.no_grad():
            outs[coords] = net(torch.zeros(1, 1, 32, 32), torch.tensor([0.5]), {})[0, 0, 10:22, 10:22]
    assert float(outs[False].std()) < 0.01 * float(outs[True].std())  # float noise against real variation
