"""The image_concat conditioner: super-resolution and inpainting inputs on the concat route."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import unfog
from unfog.config import params_of
from unfog.errors import ConfigError, DataError
from unfog_conditioners.image_concat import box_mask

SHAPE = (3, 16, 16)


def image_concat(**kw):  # noqa: ANN003, ANN201
    return unfog.create("conditioner", "image_concat", **{"data_shape": SHAPE, **kw})


def blob(n: int = 2) -> torch.Tensor:
    """A smooth image: a wide Gaussian bump, one per row with a different height."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    bump = torch.exp(-((xx - 7.5) ** 2 + (yy - 6.0) ** 2) / (2 * 4.0**2))
    return torch.stack([(i + 1) * bump.expand(3, 16, 16) for i in range(n)]) - 0.5


# -- super-resolution ---------------------------------------------------------------------


def test_super_resolution_gives_image_channels_at_the_model_size():
    c = image_concat(factor=4)
    out = c(torch.randn(2, 3, 16, 16))
    assert c.route == "concat" and c.dim == 3
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    assert c(torch.randn(2, 3, 4, 4)).shape == (2, 3, 16, 16)  # a low-resolution input works too
    assert c(torch.randn(2, 3, 32, 24, dtype=torch.float64)).shape == (2, 3, 16, 16)  # any size, float64


def test_a_constant_image_stays_constant():
    out = image_concat()(torch.full((2, 3, 16, 16), 0.3))
    torch.testing.assert_close(out, torch.full_like(out, 0.3))


def test_an_image_and_its_area_downsampled_version_condition_alike():
    c = image_concat(factor=2)
    x = torch.randn(3, 3, 16, 16)
    low = F.avg_pool2d(x, 2)
    torch.testing.assert_close(c(low), c(x))
    # nothing above the low resolution survives: changing a pixel within its 2x2 block's mean is invisible
    y = x.clone()
    y[:, :, 0, 0] += 1.0
    y[:, :, 0, 1] -= 1.0
    torch.testing.assert_close(c(y), c(x))


def test_smooth_images_survive_and_the_finest_checkerboard_is_gone():
    c = image_concat(factor=2)
    x = blob()
    span = x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))
    assert ((c(x) - x).abs().amax(dim=(1, 2, 3)) < 0.07 * span).all()  # within 7 % of each image's range
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1.0  # ±1 pixels
    out = c(checker.expand(2, 3, 16, 16))
    torch.testing.assert_close(out, torch.zeros_like(out))


def test_degrade_shows_the_low_resolution_blocks():
    c = image_concat(factor=4)
    shown = c.degrade(torch.randn(2, 3, 16, 16))
    assert shown.shape == (2, 3, 16, 16)
    blocks = shown.unfold(2, 4, 4).unfold(3, 4, 4)  # (2, 3, 4, 4, 4, 4): one 4x4 block per low-res pixel
    torch.testing.assert_close(blocks, blocks[..., :1, :1].expand_as(blocks))


# -- inpainting ---------------------------------------------------------------------------


def test_inpainting_is_the_masked_image_and_the_mask():
    c = image_concat(task="inpainting").eval()
    assert c.dim == 4
    x = torch.randn(2, 3, 16, 16)
    m = box_mask(2, 16, box=(2, 3, 5, 7))
    out = c({"image": x, "mask": m})
    assert out.shape == (2, 4, 16, 16)
    torch.testing.assert_close(out, torch.cat([x * (1 - m), m], dim=1), rtol=0, atol=0)
    known = m[:, 0] == 0
    torch.testing.assert_close(out[:, :3].permute(1, 0, 2, 3)[:, known], x.permute(1, 0, 2, 3)[:, known],
                               rtol=0, atol=0)  # known pixels unchanged
    assert int(m.sum()) == 2 * 5 * 7
    # the same through forward(..., mask=), with a (B, H, W) bool mask, and as a C+1-channel tensor
    torch.testing.assert_close(c(x, mask=m[:, 0].bool()), out)
    torch.testing.assert_close(c(out), out)
    torch.testing.assert_close(c.degrade(x, mask=m), x * (1 - m))


def test_masks_and_images_of_another_size_are_resized():
    c = image_concat(task="inpainting").eval()
    m = torch.zeros(1, 1, 8, 8)
    m[..., :4, :] = 1  # top half unknown, at half resolution
    out = c({"image": torch.ones(1, 3, 32, 32), "mask": m})
    assert out.shape == (1, 4, 16, 16)
    assert out[0, 3, :8].eq(1).all() and out[0, 3, 8:].eq(0).all()
    assert out[0, :3, 8:].eq(1).all() and out[0, :3, :8].eq(0).all()


def test_random_training_masks_vary_are_partial_and_follow_the_seed():
    c = image_concat(task="inpainting").train()
    x = torch.randn(16, 3, 16, 16)
    torch.manual_seed(3)
    first = c(x)[:, 3]
    torch.manual_seed(3)
    again = c(x)[:, 3]
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    filled = first.mean(dim=(1, 2))
    assert (filled > 0).all() and (filled < 1).all()  # each mask non-empty and non-full
    assert len({tuple(row.flatten().tolist()) for row in first}) > 8  # rows differ
    assert ((first == 0) | (first == 1)).all()
    halves = (filled == 0.5).sum()
    assert 0 < halves < 16  # a mix of half-image (outpainting) masks and rectangles


def test_sampling_without_a_mask_says_how_to_give_one():
    c = image_concat(task="inpainting", field="photo").eval()
    with pytest.raises(DataError, match=r"inpainting needs a mask.*'photo'.*\{'image': images, 'mask': masks\}"):
        c(torch.randn(2, 3, 16, 16))


def test_bad_masks_fail_naming_the_field():
    c = image_concat(task="inpainting").eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(DataError, match="'x'.*only 0 and 1"):
        c({"image": x, "mask": torch.full((2, 1, 16, 16), 0.5)})
    with pytest.raises(DataError, match=r"'x'.*\(2, 1, h, w\)"):
        c({"image": x, "mask": torch.ones(3, 1, 16, 16)})
    with pytest.raises(DataError, match="keys"):
        c({"img": x, "mask": torch.ones(2, 1, 16, 16)})


# -- guidance and null values -------------------------------------------------------------


@pytest.mark.parametrize("task", ["super_resolution", "inpainting"])
def test_dropped_rows_are_the_null_conditioning_and_null_value_round_trips(task):
    c = image_concat(task=task).eval()
    x = blob(3)
    value = {"image": x, "mask": box_mask(3, 16)} if task == "inpainting" else x
    out = c(value, torch.tensor([False, True, False]))
    null = c(c.null_value(3))
    expected_null = torch.zeros(3, c.dim, 16, 16)
    if task == "inpainting":
        expected_null[:, 3] = 1.0  # everything unknown
    torch.testing.assert_close(null, expected_null, rtol=0, atol=0)
    torch.testing.assert_close(out[1], null[1], rtol=0, atol=0)
    torch.testing.assert_close(out[[0, 2]], c(value)[[0, 2]])
    assert not torch.allclose(out[0], null[0])


def test_null_conditioning_in_training_mode_needs_no_random_mask():
    c = image_concat(task="inpainting").train()
    out = c(torch.randn(4, 3, 16, 16), torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(out, c(c.null_value(4)), rtol=0, atol=0)


# -- errors and configuration -------------------------------------------------------------


@pytest.mark.parametrize("task", ["super_resolution", "inpainting"])
def test_wrong_channels_rank_or_dtype_fail_naming_the_field(task):
    c = image_concat(task=task, field="lowres").eval()
    mask = box_mask(2, 16)
    wrap = (lambda v: {"image": v, "mask": mask}) if task == "inpainting" else (lambda v: v)
    with pytest.raises(DataError, match=r"image_concat: field 'lowres' must be .*\(B, 3, h, w\)"):
        c(wrap(torch.randn(2, 2, 16, 16)))
    with pytest.raises(DataError, match="'lowres'.*shape \\(3, 16, 16\\)"):
        c(wrap(torch.randn(3, 16, 16)))
    with pytest.raises(DataError, match="'lowres'.*dtype torch.uint8"):
        c(wrap(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)))
    if task == "super_resolution":  # C + 1 channels mean image + mask for inpainting only
        with pytest.raises(DataError, match="'lowres'"):
            c(torch.randn(2, 4, 16, 16))


def test_bad_settings_refused():
    with pytest.raises(ConfigError, match="factor"):
        image_concat(factor=0)
    with pytest.raises(ConfigError, match="factor.*divide"):
        image_concat(factor=3)
    with pytest.raises(ConfigError, match="dropout"):
        image_concat(dropout=1.0)
    with pytest.raises(ConfigError, match="dropout"):
        image_concat(dropout=-0.1)
    with pytest.raises(ConfigError, match=r"\(C, H, W\)"):
        image_concat(data_shape=(2,))
    with pytest.raises(ConfigError, match="box"):
        box_mask(1, 16, box=(10, 0, 8, 4))


def test_builds_from_the_registry_with_a_schema_and_wired_data_shape():
    entry = unfog.get("conditioner", "image_concat")
    params = {p.name: p for p in params_of(entry.obj)}
    assert "data_shape" not in params
    assert set(params) == {"task", "field", "factor", "mask_field", "dropout"}
    assert params["task"].choices == ("super_resolution", "inpainting")
    from omegaconf import OmegaConf

    from unfog.config import build, schema

    node = OmegaConf.structured(schema(entry))
    node.task = "inpainting"
    c = build("conditioner", node, data_shape=SHAPE, num_classes=None)
    assert c.task == "inpainting" and c.dim == 4 and c.field == "x"
    assert list(c.state_dict()) == []  # nothing learned, nothing saved


def test_works_inside_the_model_on_the_concat_route():
    from unfog.model import DiffusionModel

    backbone = unfog.create("backbone", "mlp", data_shape=(2,), cond_dim=0)
    model = DiffusionModel(backbone, {"sr": image_concat(factor=2)}).train()
    cond = model.encode({"x": torch.randn(4, 3, 16, 16)}, 4, drop="all")
    assert set(cond) == {"concat"}
    torch.testing.assert_close(cond["concat"], torch.zeros(4, 3, 16, 16))
