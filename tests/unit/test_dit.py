"""Unit tests of the ``dit`` backbone (Peebles & Xie 2023)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import unfog
import unfog_backbones.dit  # noqa: F401  (registers "dit" until the package __init__ imports it)
from unfog.errors import ConfigError
from unfog.protocols import Backbone
from unfog_backbones.dit import DIT_PRESETS, sincos_pos_embed_2d

TINY: dict[str, Any] = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4)
SHAPE = (3, 8, 8)
COND_DIM, CONTEXT_DIM, COND_CHANNELS, TOKENS = 5, 6, 2, 3
CONF = Path(__file__).resolve().parents[2] / "conf" / "backbone"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These networks are tiny: a second intra-op thread only adds synchronisation, and on a
    busy 2-core machine it makes each step ~15x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dit(data_shape: tuple[int, ...] = SHAPE, **kw: Any) -> nn.Module:
    return unfog.create("backbone", "dit", data_shape=data_shape, **{**TINY, **kw})


def routed(**kw: Any) -> nn.Module:
    """A tiny DiT that consumes all three conditioning routes."""
    return dit(cond_dim=COND_DIM, context_dim=CONTEXT_DIM, cond_channels=COND_CHANNELS, **kw)


def inputs(shape: tuple[int, ...] = SHAPE, n: int = 4, routes: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=gen)
    t = torch.rand(n, generator=gen)
    if not routes:
        return x, t, {}
    cond = {
        "vector": torch.randn(n, COND_DIM, generator=gen),
        "tokens": torch.randn(n, TOKENS, CONTEXT_DIM, generator=gen),
        "concat": torch.randn(n, COND_CHANNELS, *shape[1:], generator=gen),
    }
    return x, t, cond


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Add noise to every parameter so that zero-initialised layers no longer block anything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


# --- (a) parameter counts -----------------------------------------------------------------


def official_dit_params(hidden: int, depth: int, patch: int = 2, channels: int = 4, side: int = 32) -> int:
    """Parameters of ``DiT_{S,B,L,XL}_{patch}`` in the paper's code (facebookresearch/DiT,
    models.py) for class-conditional ImageNet 256x256: 4x32x32 latents, learn_sigma=True (2·C
    output channels), 1000 classes, MLP ratio 4 — what its train.py prints as "DiT Parameters"."""
    def linear(i: int, o: int) -> int:
        return i * o + o

    block = (
        linear(hidden, 3 * hidden)  # qkv (timm Attention, qkv_bias=True)
        + linear(hidden, hidden)  # attention output projection
        + linear(hidden, 4 * hidden) + linear(4 * hidden, hidden)  # MLP
        + linear(hidden, 6 * hidden)  # adaLN-Zero modulation
    )
    return (
        linear(channels * patch * patch, hidden)  # PatchEmbed (a conv with kernel = stride = patch)
        + (side // patch) ** 2 * hidden  # pos_embed: an nn.Parameter there (requires_grad=False), so counted
        + linear(256, hidden) + linear(hidden, hidden)  # timestep MLP
        + 1001 * hidden  # LabelEmbedder table: 1000 classes + the null class for guidance
        + depth * block
        + linear(hidden, 2 * hidden) + linear(hidden, patch * patch * 2 * channels)  # final layer
    )


@pytest.mark.parametrize(
    "size, official, paper",
    [
        ("S", 32_963_360, 33e6),  # Table 1 of the paper rounds to 33 M
        ("B", 130_512_416, 130e6),  # ... and to 130 M
    ],
)
def test_paper_parameter_counts(size: str, official: int, paper: float) -> None:
    depth, hidden, heads = DIT_PRESETS[size]
    assert official_dit_params(hidden, depth) == official
    # cond_dim=0: unfog keeps the class table in the class_label conditioner, and a vector route
    # adds a Linear(cond_dim, hidden) projection the paper does not have. So count the backbone
    # alone and add what the official DiT holds outside it: the 1001-row class table and the
    # frozen position embedding (a non-persistent buffer here, not a parameter).
    with torch.device("meta"):  # no memory, no initialisation: B/2 builds in milliseconds
        model = unfog.create(
            "backbone", "dit", data_shape=(4, 32, 32), cond_dim=0, patch_size=2,
            hidden_size=hidden, depth=depth, num_heads=heads, learn_sigma=True,
        )
    backbone = sum(p.numel() for p in model.parameters())
    assert model.pos_embed.shape == (1, 256, hidden) and not any(b is model.pos_embed for b in model.parameters())
    total = backbone + nn.Embedding(1001, hidden, device="meta").weight.numel() + model.pos_embed.numel()
    assert total == official
    assert abs(total - official) / official < 0.01  # the brief's tolerance, met exactly
    assert abs(total - paper) / paper < 0.01


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def test_presets_match_table_1(size: str) -> None:
    node = OmegaConf.load(CONF / f"dit_{size.lower()}2.yaml")
    assert list(node.defaults) == ["dit", "_self_"]
    assert (node.depth, node.hidden_size, node.num_heads, node.patch_size) == (*DIT_PRESETS[size], 2)
    tiny = OmegaConf.load(CONF / "dit_tiny.yaml")
    assert tiny.hidden_size % tiny.num_heads == 0 and 16 % tiny.patch_size == 0


# --- (b) shapes and routes -----------------------------------------------------------------


def test_registered_as_a_backbone() -> None:
    entry = unfog.get("backbone", "dit")
    assert entry.obj.data_ranks == (3,)
    assert entry.obj.routes == ("vector", "tokens", "concat")
    assert "2023" in entry.summary
    assert isinstance(dit(), Backbone)


@pytest.mark.parametrize(
    "shape, patch",
    [((3, 8, 8), 1), ((3, 8, 8), 2), ((3, 8, 8), 4), ((2, 8, 12), 4), ((1, 6, 4), 2)],
)
def test_output_shape_with_every_route(shape: tuple[int, ...], patch: int) -> None:
    model = perturb(routed(data_shape=shape, patch_size=patch))
    x, t, cond = inputs(shape)
    assert model(x, t, cond).shape == x.shape
    assert dit(data_shape=shape, patch_size=patch)(*inputs(shape, routes=False)).shape == x.shape


@pytest.mark.parametrize("route", ["vector", "tokens", "concat"])
def test_each_route_changes_the_output(route: str) -> None:
    model = perturb(routed()).eval()
    x, t, cond = inputs()
    other = {**cond, route: cond[route] + 1.0}
    assert not torch.allclose(model(x, t, cond), model(x, t, other))


def test_time_changes_the_output() -> None:
    model = perturb(dit()).eval()
    x, t, cond = inputs(routes=False)
    assert not torch.allclose(model(x, t, cond), model(x, 1.0 - t, cond))


def test_learn_sigma_keeps_the_output_shaped_like_x() -> None:
    model = perturb(dit(learn_sigma=True))
    assert model.final_layer.linear.out_features == 2 * 2 * 2 * SHAPE[0]  # p·p·2C, as the paper
    x, t, cond = inputs(routes=False)
    assert model(x, t, cond).shape == x.shape


def test_every_parameter_gets_a_gradient() -> None:
    model = perturb(routed())
    model(*inputs()).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_unpatchify_inverts_row_major_patches() -> None:
    model = dit(data_shape=(2, 4, 6), learn_sigma=False)
    img = torch.randn(3, 2, 4, 6)
    p, (rows, cols) = 2, model.grid
    # patchify as the paper's code lays out the final layer's output: (h, w) tokens of (p, q, c)
    tokens = torch.einsum("nchpwq->nhwpqc", img.reshape(3, 2, rows, p, cols, p)).reshape(3, rows * cols, -1)
    assert torch.equal(model.unpatchify(tokens), img)


def test_position_embedding_is_maes() -> None:
    """Against a transcription of MAE's get_2d_sincos_pos_embed (as used by DiT), square grid."""
    dim, n = 16, 3
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    grid_w, grid_h = torch.meshgrid(torch.arange(float(n)), torch.arange(float(n)), indexing="xy")

    def one(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1).double() * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    expected = torch.cat([one(grid_w), one(grid_h)], dim=1).float()
    assert torch.allclose(sincos_pos_embed_2d(dim, n, n), expected)
    assert sincos_pos_embed_2d(dim, 2, 5).shape == (10, dim)


# --- (c) adaLN-Zero: identity blocks, zero output at init ----------------------------------


def test_output_is_exactly_zero_at_init() -> None:
    x, t, cond = inputs()
    assert torch.all(routed()(x, t, cond) == 0)


def test_every_block_starts_as_the_identity() -> None:
    model = routed()
    x, t, cond = inputs()
    h = torch.randn(4, model.grid[0] * model.grid[1], TINY["hidden_size"])
    c = model.embed(t, cond)
    for block in model.blocks:
        assert torch.equal(block(h, c, cond["tokens"]), h)


# --- (d) fused and explicit attention agree --------------------------------------------------


def test_fused_and_explicit_attention_agree() -> None:
    fused = perturb(routed(fused_attention=True)).eval()
    explicit = routed(fused_attention=False).eval()
    explicit.load_state_dict(fused.state_dict())
    assert all(not b.attn.fused_attn and not b.cross_attn.fused_attn for b in explicit.blocks)
    assert all(b.attn.fused_attn and b.cross_attn.fused_attn for b in fused.blocks)
    x, t, cond = inputs()
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t, cond), explicit(x, t, cond), atol=1e-5, rtol=1e-5)


# --- (e) settings that cannot work ------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(data_shape=(64,)), r"data_shape must be an image shape \(C, H, W\).*'mlp'"),
        (dict(data_shape=(3, 8, 10), patch_size=4), r"8x10 must be divisible by patch_size=4.*\[1, 2\]"),
        (dict(hidden_size=36, num_heads=8), r"hidden_size=36 must be divisible by num_heads=8.*num_heads from"),
        (dict(hidden_size=30, num_heads=2), r"divisible by 4.*hidden_size=32"),
        (dict(depth=0), "depth must be at least 1"),
        (dict(patch_size=0), "patch_size must be at least 1"),
        (dict(mlp_ratio=0.0), "mlp_ratio must be positive"),
        (dict(cond_dim=-1), "cond_dim must be 0"),
        (dict(context_dim=-2), "context_dim must be 0"),
    ],
)
def test_invalid_settings_raise(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dit(**kw)


def test_wrong_conditioning_raises() -> None:
    x, t, cond = inputs()
    with pytest.raises(ConfigError, match="context_dim=6, so it needs 'tokens'"):
        routed()(x, t, {k: v for k, v in cond.items() if k != "tokens"})
    with pytest.raises(ConfigError, match="unconditional"):
        dit()(x, t, {"vector": cond["vector"]})


def test_missing_timm_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("timm", "timm.layers", "timm.models", "timm.models.vision_transformer"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install 'unfog\[dit\]'"):
        dit()


def test_importing_the_backbones_does_not_import_timm() -> None:
    code = "import sys, unfog_backbones, unfog_backbones.dit; assert 'timm' not in sys.modules, 'timm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- (f) it trains -----------------------------------------------------------------------------


def test_adamw_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    model = routed(data_shape=(1, 8, 8))
    x, t, cond = inputs((1, 8, 8))
    target = torch.sin(3 * x) + cond["concat"][:, :1]  # depends on the input and a route
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = (model(x, t, cond) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # 1.50 -> 0.24 when written
