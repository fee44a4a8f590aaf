"""``backbone=auto``: the config it resolves for each kind of data builds, runs and matches the presets."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import unfog
from unfog.commands import conf_dir
from unfog.config import build, plain, register_configs, schema
from unfog.errors import ConfigError
from unfog_backbones.auto import AutoBackbone

# data shape -> parameters of the resolved backbone, unconditional (also in docs/backbones.md)
COUNTS: dict[tuple[int, ...], int] = {
    (1, 8, 8): 176_849,
    (3, 24, 24): 6_803_715,
    (3, 30, 40): 6_803_715,
    (3, 64, 64): 9_283_587,
    (1, 2048): 716_801,
    (1, 4096): 964_609,
    (2,): 695_298,
    (3, 4, 16, 16): 1_775_011,
}


def _id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) + f"-{COUNTS[shape] / 1e6:.2f}M"


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _preset(name: str) -> dict[str, Any]:
    """The backbone node Hydra composes for ``backbone=NAME``, every field filled in."""
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return plain(compose(config_name="train", overrides=[f"backbone={name}"]).backbone)


def _seeded(node: dict[str, Any], **wiring: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build("backbone", node, **wiring).state_dict()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny forward passes: a second thread mostly waits for a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", list(COUNTS), ids=_id)
def test_resolved_node_builds_runs_and_has_its_parameter_count(shape: tuple[int, ...]) -> None:
    node = AutoBackbone.resolve(shape)
    net = build("backbone", node, data_shape=shape)
    assert _count(net) == COUNTS[shape]
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert net(x, torch.rand(2), {}).shape == x.shape
    entry = unfog.get("backbone", node["_name_"])  # the node fits the typed config schema unchanged
    assert plain(OmegaConf.merge(OmegaConf.structured(schema(entry)), node)) == node


@pytest.mark.parametrize(
    "shape, preset, wiring",
    [
        ((1, 8, 8), "unet_digits", dict(cond_dim=128)),  # the default `unfog train`: class_label, dim 128
        ((1, 2048), "unet1d_tones", {}),  # experiment=tones
        ((2,), "mlp_toy", {}),  # experiment=toy2d
    ],
)
def test_rule_gives_exactly_the_preset(shape: tuple[int, ...], preset: str, wiring: dict[str, Any]) -> None:
    """Same node, field for field, and bit-identical weights from the same seed: runs that switch
    to backbone=auto train the same network as before."""
    node, want = AutoBackbone.resolve(shape), _preset(preset)
    assert node == want
    mine, theirs = _seeded(node, data_shape=shape, **wiring), _seeded(want, data_shape=shape, **wiring)
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_shapes_sized_images_get_unet_shapes_with_wider_heads_and_no_coordinates() -> None:
    node, shapes = AutoBackbone.resolve((3, 16, 16)), _preset("unet_shapes")
    assert {k: v for k, v in node.items() if node[k] != shapes[k]} == {"num_heads": 2, "coord_channels": False}


def test_calling_auto_builds_the_resolved_backbone_with_its_wiring() -> None:
    shape, wiring = (3, 16, 16), dict(cond_dim=5, context_dim=6, cond_channels=2)
    torch.manual_seed(0)
    made = unfog.create("backbone", "auto", data_shape=shape, **wiring)
    torch.manual_seed(0)
    via_config = build("backbone", {"_name_": "auto"}, data_shape=shape, **wiring)
    direct = _seeded(AutoBackbone.resolve(shape), data_shape=shape, **wiring)
    assert type(made).__name__ == "UNetBackbone" and made.context_dim == 6 and made.cond_channels == 2
    assert all(torch.equal(made.state_dict()[k], v) and torch.equal(via_config.state_dict()[k], v)
               for k, v in direct.items())
    entry = unfog.get("backbone", "auto")
    assert entry.obj.data_ranks == (1, 2, 3, 4) and entry.obj.routes == ("vector", "tokens", "concat")


@pytest.mark.parametrize("side", [1, 2, 3, 5, 8, 9, 15, 16, 17, 24, 31, 33, 47, 63, 64, 65, 100, 127, 128, 129, 200,
                                  255, 256, 257, 512, 1000, 1024])
def test_image_rule_builds_for_any_size(side: int) -> None:
    """Every size resolves to a valid U-Net: levels 2 to 5 with the deepest at most 8 unless
    capped, groups and heads that divide the widths (built on the meta device: no memory)."""
    node = AutoBackbone.resolve((3, side, side + 7))
    levels = len(node["channel_mult"])
    deepest = -(-side // 2 ** (levels - 1))
    assert 2 <= levels <= 5 and (deepest <= 8 or levels == 5)
    assert levels - 1 in node["attention_levels"] and 0 not in node["attention_levels"]
    with torch.device("meta"):
        build("backbone", node, data_shape=(3, side, side + 7))


@pytest.mark.parametrize("length", [1, 2, 100, 256, 257, 1000, 2048, 2049, 8192, 44100, 10**6])
def test_sound_rule_builds_for_any_length(length: int) -> None:
    node = AutoBackbone.resolve((2, length))
    levels = len(node["channel_mult"])
    assert 2 <= levels <= 6 and (-(-length // 2 ** (levels - 1)) <= 256 or levels == 6)
    assert node["attention_levels"] == [levels - 1] and node["kernel_size"] == 5
    with torch.device("meta"):
        build("backbone", node, data_shape=(2, length))


@pytest.mark.parametrize("shape", [(), (0, 8), (1, 2, 3, 4, 5)])
def test_shapes_without_a_rule_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match=r"auto: no rule for data_shape.*Choose a backbone by name"):
        AutoBackbone.resolve(shape)
