"""Unit tests of the first-party backbones ``mlp`` and ``unet`` (1-D, 2-D and 3-D), and of loading
configs and weights saved by the former image-only ``unet`` and ``unet1d``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

import unfog
from unfog.config import build
from unfog.errors import ConfigError
from unfog_backbones.embeddings import sinusoidal_embedding
from unfog_backbones.unet import UNetBackbone

TINY_UNET: dict[str, Any] = dict(
    channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), dropout=0.0, groups=8
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
        attention_levels=(1,),
        dropout=0.1,
    )
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 1) == 35.7
    assert abs(n - 35_746_307) / 35_746_307 < 1e-3


def test_registered_with_class_attributes() -> None:
    assert {"mlp", "unet"} <= set(unfog.available("backbone"))
    assert unfog.get("backbone", "unet").obj.data_ranks == (2, 3, 4)
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
    model = unet(**{"data_shape": (3, 16, 8), "attention_levels": (1,), **kw})
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
        (dict(data_shape=(64,)), r"data_shape must be \(C, L\) for sequences"),
        (dict(data_shape=(1, 2, 2, 2, 2)), r"\(C, T, H, W\) for video"),
        (dict(data_shape=(1, 0, 8)), "positive sizes"),
        (dict(attention_levels=(2,)), r"unet: attention_levels \[2\] include \[2\].*levels are \[0, 1\]"),
        (dict(attention_levels=(-1,)), r"levels are \[0, 1\]"),
        (dict(channels=20), "divisible by groups=8"),
        (dict(channels=4, channel_mult=(2, 4)), r"divisible by groups=8.*not: \[4\]"),  # the input width too
        (dict(kernel_size=4), "kernel_size must be a positive odd"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(groups=0), "groups must be at least 1"),
        (dict(context_dim=-1), "context_dim"),
        (dict(cond_channels=-1), "cond_channels"),
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
    kw = dict(data_shape=(1, 32, 32), channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(),
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


# ------------------------------------------------------------------ any dimension, any size


@pytest.mark.parametrize(
    "shape, kw",
    [
        pytest.param((1, 12, 12), dict(channel_mult=(1, 2, 2, 2)), id="12x12-4-levels"),
        pytest.param((1, 40, 30), dict(channel_mult=(1, 2, 2, 2)), id="40x30-4-levels"),
        pytest.param((3, 24, 24), dict(channel_mult=(1, 2, 2, 2), attention_levels=(2, 3)), id="24x24-4-levels"),
        pytest.param((1, 7, 5), dict(coord_channels=True), id="7x5-coords"),
        pytest.param((2, 1000), dict(channel_mult=(1, 2, 2, 2), kernel_size=5), id="L1000-4-levels"),
        pytest.param((1, 1), dict(channel_mult=(1, 2, 2)), id="L1-3-levels"),
        pytest.param((2, 33), dict(coord_channels=True, resblock_updown=True), id="L33-coords-updown"),
        pytest.param((2, 4, 8, 8), dict(), id="video-4x8x8"),
        pytest.param((1, 3, 6, 5), dict(coord_channels=True, use_scale_shift_norm=True, resblock_updown=True),
                     id="video-3x6x5-adm-coords"),
    ],
)
@pytest.mark.parametrize("routes", [False, True], ids=["plain", "all-routes"])
def test_any_rank_and_size_keeps_the_shape_and_trains(shape: tuple[int, ...], kw: dict[str, Any],
                                                      routes: bool) -> None:
    wiring = dict(cond_dim=COND_DIM, context_dim=5, cond_channels=2) if routes else {}
    model = perturb(unet(data_shape=shape, **{**wiring, **kw}))
    x, t, _ = inputs(shape, 0, n=2)
    cond = {"vector": torch.randn(2, COND_DIM), "tokens": torch.randn(2, 3, 5),
            "concat": torch.randn(2, 2, *shape[1:])} if routes else {}
    out = model(x, t, cond)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_odd_sizes_are_padded_at_the_end_by_replication_and_cropped_back() -> None:
    """A 7×5 image through a 3-level U-Net is the 8×8 image padded by its last row and columns."""
    model = perturb(unet(data_shape=(1, 7, 5), channel_mult=(1, 2, 2))).eval()
    x, t, cond = inputs((1, 7, 5), 0, n=2)
    padded = F.pad(x, (0, 3, 0, 1), mode="replicate")
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond), model(padded, t, cond)[:, :, :7, :5])


@pytest.mark.parametrize("shape, conv", [((2, 16), nn.Conv1d), ((1, 8, 8), nn.Conv2d), ((1, 2, 4, 4), nn.Conv3d)])
def test_convolutions_and_coordinates_follow_the_number_of_spatial_axes(shape: tuple[int, ...], conv: type) -> None:
    model = unet(data_shape=shape, coord_channels=True, kernel_size=5)
    assert type(model.inp) is conv and model.inp.kernel_size == (5,) * (len(shape) - 1)
    assert model.inp.in_channels == shape[0] + len(shape) - 1  # one coordinate per spatial axis
    assert {type(m) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)} == {conv}


# -------------------------------------------------- configs and weights of the former backbones

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "old_backbones"


def _fixture(name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    path = FIXTURES / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return json.loads(meta["node"]), json.loads(meta["wiring"]), load_file(str(path))


@pytest.mark.parametrize("name", ["unet_8x8", "unet1d_32"])
def test_old_configs_and_weights_load_and_give_the_recorded_output(name: str) -> None:
    """Weights saved by the former ``unet`` / ``unet1d`` load into the upgraded config with strict
    key matching and reproduce the output recorded by the old code (tests/fixtures/old_backbones)."""
    node, wiring, tensors = _fixture(name)
    entry = unfog.get("backbone", node["_name_"])  # "unet1d" is found through `replaces`
    assert entry.obj is UNetBackbone
    upgraded = entry.obj.upgrade_config(node, wiring)
    assert upgraded["_name_"] == "unet" and "attention_resolutions" not in upgraded
    model = build("backbone", upgraded, **{**wiring, "data_shape": tuple(wiring["data_shape"])}).eval()
    model.load_state_dict({k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")})
    cond = {k.removeprefix("input.cond."): v for k, v in tensors.items() if k.startswith("input.cond.")}
    with torch.no_grad():
        out = model(tensors["input.x"], tensors["input.t"], cond)
    torch.testing.assert_close(out, tensors["output"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "node, data_shape, want",
    [
        ({"_name_": "unet", "channel_mult": [1, 2], "attention_resolutions": [4]}, (1, 8, 8), [1]),
        ({"_name_": "unet", "attention_resolutions": [16]}, (3, 32, 32), [1]),  # the old default mult
        ({"_name_": "unet", "channel_mult": [1, 2, 2, 2], "attention_resolutions": [16, 4]}, (3, 32, 64), [1, 3]),
        ({"_name_": "unet", "attention_resolutions": []}, None, []),
    ],
)
def test_upgrade_turns_pixel_sides_into_levels(node: dict[str, Any], data_shape: Any, want: list[int]) -> None:
    upgraded = UNetBackbone.upgrade_config(node, {"data_shape": data_shape})
    assert upgraded == {**{k: v for k, v in node.items() if k != "attention_resolutions"}, "attention_levels": want}


def test_upgrade_gives_an_old_unet1d_node_its_old_defaults() -> None:
    """The former unet1d always used the scale-shift norm, and its defaults differ from unet's."""
    upgraded = UNetBackbone.upgrade_config({"_name_": "unet1d", "channels": 8, "kernel_size": 3}, {})
    assert upgraded == {"_name_": "unet", "channels": 8, "channel_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                        "attention_levels": [3], "num_heads": 4, "kernel_size": 3, "dropout": 0.0, "groups": 8,
                        "use_scale_shift_norm": True}
    assert build("backbone", upgraded, data_shape=(1, 64)) is not None


def test_upgrade_leaves_a_current_node_unchanged() -> None:
    node = {"_name_": "unet", "channels": 16, "attention_levels": [1], "kernel_size": 5}
    assert UNetBackbone.upgrade_config(node, {"data_shape": (1, 8, 8)}) == node


@pytest.mark.parametrize(
    "node, wiring, match",
    [
        ({"_name_": "unet", "attention_resolutions": [4]}, {}, "needs the data shape"),
        ({"_name_": "unet", "channel_mult": [1, 2], "attention_resolutions": [2]}, {"data_shape": (1, 8, 8)},
         r"never reach.*sides are \[8, 4\]"),
        ({"_name_": "unet", "attention_resolutions": [4], "attention_levels": [1]}, {"data_shape": (1, 8, 8)},
         "both attention_resolutions"),
    ],
)
def test_upgrade_refuses_what_it_cannot_convert(node: dict[str, Any], wiring: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        UNetBackbone.upgrade_config(node, wiring)
