"""Every registered component against its kind's contract (unfog.testing).

Test classes are generated from the registry itself, so a component is covered the moment
it is registered; only its test-size arguments may need an entry in ``KWARGS``.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import unfog
from unfog import testing
from unfog.protocols import Resolver

SUITES: dict[str, type] = {
    "backbone": testing.BackboneContract,
    "schedule": testing.ScheduleContract,
    "sampler": testing.SamplerContract,
    "conditioner": testing.ConditionerContract,
    "dataset": testing.DatasetContract,
    "metric": testing.MetricContract,
    "autoencoder": testing.AutoencoderContract,
    "exporter": testing.ExporterContract,
    "pipeline": testing.PipelineContract,
}
NONE_YET = {"pipeline": "the kernel reads its own checkpoints and exports; plugin formats (pretrained folders, "
                        "cascades) are pipeline entries, tested in tests/unit/test_pipeline.py with one made there"}


def _image_folder() -> str:
    root = Path(tempfile.mkdtemp(prefix="unfog-contract-"))
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return str(root)


def _audio_folder() -> str:
    from unfog.audio import write_wavs

    root = Path(tempfile.mkdtemp(prefix="unfog-contract-audio-"))
    clips = torch.sin(torch.linspace(0, 200, 300))[None, None].repeat(2, 1, 1) * 0.5
    for label in ("a", "b"):
        write_wavs(clips, 8000, root / label)
    return str(root)


def _tones_inputs(self: Any) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    batch = next(iter(DataLoader(unfog.create("dataset", "tones", size=6), batch_size=6)))
    return {"generated": batch["x"], "real": torch.randn(6, 1, 4096, generator=torch.Generator().manual_seed(0)) * 0.3}


def _feature_metric_kwargs() -> dict[str, Any]:
    """A tiny feature extractor standing in for Inception (whose weights cannot be downloaded here)."""
    from torch import nn

    from unfog_metrics.features import module_extractor

    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    logits = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))
    return dict(extractor=module_extractor(features, "contract", logits_module=logits), device="cpu")


def _image_pair_inputs(self: Any) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {"generated": torch.rand(12, 3, 8, 8, generator=g) * 2 - 1,
            "real": torch.rand(12, 3, 8, 8, generator=g) * 2 - 1}


@functools.lru_cache(maxsize=1)
def _tiny_classifier() -> str:
    """A digits classifier trained for 5 steps: enough to load and run, not to be accurate."""
    from unfog_metrics.classifier import train_classifier

    out = Path(tempfile.mkdtemp(prefix="unfog-contract-classifier-"))
    train_classifier({"dataset": {"_name_": "digits"}, "steps": 5, "width": 4, "feature_dim": 16, "device": "cpu"}, out)
    return str(out)


def _points_inputs(self: Any) -> dict[str, Any]:
    from unfog_datasets.toy2d import sample_toy2d

    return {"generated": sample_toy2d("two_moons", 200, 1), "real": sample_toy2d("two_moons", 300, 2)}


@functools.lru_cache(maxsize=1)
def _tiny_vae_folder() -> str:
    """A randomly initialised, tiny diffusers AutoencoderKL saved with save_pretrained: a folder
    like Stable Diffusion's vae/, small enough for a test."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        sample_size=16)
    out = Path(tempfile.mkdtemp(prefix="unfog-contract-vae-"))
    vae.save_pretrained(out)
    return str(out)


FEATURE_METRICS = ("fid", "kid", "inception_score", "precision_recall")

KWARGS: dict[tuple[str, str], Any] = {
    **{("metric", n): _feature_metric_kwargs for n in FEATURE_METRICS},
    ("metric", "class_accuracy"): lambda: dict(weights=_tiny_classifier(), device="cpu"),
    ("metric", "sliced_wasserstein"): dict(projections=64),
    ("backbone", "unet"): dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                               groups=8, dropout=0.0),
    ("backbone", "mlp"): dict(hidden=32, depth=2, time_dim=16),
    ("backbone", "dit"): dict(hidden_size=32, depth=2, num_heads=2, patch_size=2),
    ("backbone", "diffusers_unet"): dict(block_out_channels=(16, 32)),
    ("dataset", "audio_folder"): lambda: dict(root=_audio_folder(), length=64, sample_rate=8000),
    ("conditioner", "class_label"): dict(num_classes=3, dim=8),
    ("conditioner", "image_concat"): dict(data_shape=(3, 8, 8)),
    ("conditioner", "text"): dict(dim=16, heads=2, layers=1, max_length=8),
    ("dataset", "image_folder"): lambda: dict(root=_image_folder(), size=8),
    ("dataset", "toy2d"): dict(size=64),
    ("autoencoder", "identity"): dict(data_shape=(3, 16, 16)),
    ("autoencoder", "kl"): dict(data_shape=(3, 16, 16), channels=8, norm_groups=4),
    ("autoencoder", "diffusers_vae"): lambda: dict(data_shape=(3, 16, 16), path=_tiny_vae_folder()),
}
SKIP: dict[tuple[str, str], str] = {
    ("backbone", "diffusers_folder"): "needs a diffusers model folder per wiring; tests/integration/test_export.py "
                                      "runs the same contract on folders it writes",
    ("dataset", "cifar10"): "needs the CIFAR-10 files; tests/unit/test_datasets.py covers it with a fake copy",
    ("dataset", "mnist"): "needs the MNIST files; tests/unit/test_datasets.py covers its offline error",
}


def _digits_inputs(self: Any) -> dict[str, Any]:
    from unfog_datasets.digits import digits_split

    x, y = digits_split("test")
    return {"generated": x[:60], "labels": y[:60]}


def _shapes_inputs(self: Any) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    batch = next(iter(DataLoader(unfog.create("dataset", "shapes", max_objects=2), batch_size=12)))
    return {"generated": batch["x"], "captions": batch["caption"]}


EXTRA: dict[tuple[str, str], dict[str, Any]] = {
    **{("metric", n): {"inputs": _image_pair_inputs} for n in FEATURE_METRICS},
    ("metric", "class_accuracy"): {"inputs": _digits_inputs},
    ("metric", "sliced_wasserstein"): {"inputs": _points_inputs},
    ("metric", "mmd"): {"inputs": _points_inputs},
    ("metric", "digits_classifier"): {"inputs": _digits_inputs},
    ("metric", "shapes_checker"): {"inputs": _shapes_inputs},
    ("metric", "tones_spectrum"): {"inputs": _tones_inputs},
    ("conditioner", "class_label"): {"values": torch.tensor([0, 2, 1, 1])},
    ("conditioner", "scalar"): {"values": torch.tensor([0.1, 0.5, float("nan"), 2.0])},
    ("conditioner", "image_concat"): {"values": torch.rand(4, 3, 4, 4)},
    ("conditioner", "text"): {"values": ["a red circle", "two blue squares", "", "a red circle"]},
    ("conditioner", "text_pretrained"): {"values": ["a red circle", "two blue squares", "", "a red circle"]},
}


def _suite(kind: str, name: str) -> type:
    kwargs = KWARGS.get((kind, name), {})
    attrs: dict[str, Any] = {"key": name, **EXTRA.get((kind, name), {})}
    if callable(kwargs):
        attrs["kwargs"] = property(lambda self, f=kwargs: f())  # built lazily, once per test
    else:
        attrs["kwargs"] = kwargs
    if (kind, name) in SKIP:
        attrs = {**attrs, "pytestmark": pytest.mark.skip(reason=SKIP[(kind, name)])}
    resolver = isinstance(unfog.get(kind, name).obj, Resolver)
    base = testing.ResolverContract if resolver and kind != "backbone" else SUITES[kind]
    attrs.setdefault("kind", kind)
    cls = type(f"Test_{kind}_{name}", (base,), attrs)
    if resolver and kind == "backbone":  # auto builds a real backbone, and resolves like any resolver
        globals()[f"Test_resolve_{kind}_{name}"] = type(f"Test_resolve_{kind}_{name}", (testing.ResolverContract,),
                                                        {"key": name, "kind": kind})
    return cls


for _kind in unfog.KINDS:
    for _name in unfog.available(_kind):
        _cls = _suite(_kind, _name)
        globals()[_cls.__name__] = _cls


def test_every_kind_has_components() -> None:
    for kind in unfog.KINDS:
        assert unfog.available(kind) or kind in NONE_YET, f"no {kind} registered"
