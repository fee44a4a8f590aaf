"""The in-domain classifier: `unfog train-classifier`'s training, its extractor and `class_accuracy`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import unfog
from unfog.errors import ConfigError, DataError
from unfog.util import sha256_of
from unfog_datasets.digits import digits_split
from unfog_metrics.classifier import (
    RECORD_FILE,
    WEIGHTS_FILE,
    ClassAccuracy,
    ClassifierExtractor,
    TrainSettings,
    train_classifier,
)

# 100 steps of a width-8 network: ≈ 2 s on one CPU thread, ≈ 85 % held-out accuracy (chance: 10 %).
TINY = {"dataset": {"_name_": "digits"}, "steps": 100, "batch_size": 64, "width": 8}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("classifier")
    return out, train_classifier(TINY, out)


def test_training_writes_weights_and_a_record(trained):
    out, result = trained
    record = json.loads((out / RECORD_FILE).read_text())
    assert result["out_dir"] == str(out)
    assert result["sha256"] == record["weights_sha256"] == sha256_of(out / WEIGHTS_FILE)
    assert record["num_classes"] == 10 and record["class_names"] == [str(i) for i in range(10)]
    assert record["data_shape"] == [1, 8, 8] and record["data_range"] == [-1.0, 1.0]
    assert record["dataset"] == {"_name_": "digits"}
    assert record["architecture"] == {"name": "ImageClassifier", "in_channels": 1, "num_classes": 10, "width": 8,
                                      "feature_dim": 128}
    assert record["held_out"]["how"] == "split=test" and record["held_out"]["n"] == 360
    assert record["train"]["steps"] == 100 and record["train"]["n"] == 1437
    assert record["versions"]["unfog"] == unfog.__version__
    assert record["accuracy"] == result["accuracy"] > 0.5  # chance is 0.1


def test_extractor_gives_penultimate_features_and_logits(trained):
    out, result = trained
    x, y = digits_split("test")
    for path in (out, out / WEIGHTS_FILE):  # the folder or its weights file
        extractor = ClassifierExtractor(path, device="cpu", batch_size=100)
        assert extractor.name == "classifier" and extractor.weights_sha256 == result["sha256"]
        features, logits = extractor.features(x[:250]), extractor.logits(x[:250])
        assert features.shape == (250, 128) and features.dtype == torch.float64 and features.device.type == "cpu"
        assert logits.shape == (250, 10) and logits.dtype == torch.float64
    # batching does not change features (up to float32 rounding: CPU kernels vary with the batch size)
    torch.testing.assert_close(extractor.features(x[:7]), features[:7], rtol=1e-5, atol=1e-6)
    assert float((extractor.predict(x) == y).double().mean()) == pytest.approx(result["accuracy"])
    described = extractor.describe()
    assert described["weights"] == str(out / WEIGHTS_FILE) and described["dim"] == 128
    assert described["weights_sha256"] == result["sha256"] and described["held_out_accuracy"] == result["accuracy"]
    json.dumps(described)


def test_extractor_refuses_images_of_another_shape(trained):
    extractor = ClassifierExtractor(trained[0], device="cpu")
    with pytest.raises(DataError, match=r"N×1×8×8.*\(4, 3, 16, 16\)"):
        extractor.features(torch.zeros(4, 3, 16, 16))


def test_extractor_refuses_missing_and_changed_weights(trained, tmp_path):
    with pytest.raises(ConfigError, match="unfog train-classifier dataset="):
        ClassifierExtractor(tmp_path / "nowhere")
    copy = tmp_path / "copy"
    shutil.copytree(trained[0], copy)
    with open(copy / WEIGHTS_FILE, "r+b") as f:  # flip one byte at the end of the weights
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ConfigError, match="changed after training"):
        ClassifierExtractor(copy)


def test_class_accuracy_scores_real_digits_like_the_held_out_accuracy(trained):
    out, result = trained
    x, y = digits_split("test")
    metric = unfog.create("metric", "class_accuracy", weights=str(out), device="cpu")
    assert isinstance(metric, ClassAccuracy)
    metric.update(generated=x[:200], labels=y[:200])
    metric.update(generated=x[200:], labels=y[200:])
    scores = metric.compute()
    assert scores["accuracy"] == pytest.approx(result["accuracy"]) and scores["n"] == 360
    assert scores["per_class_min"] <= scores["accuracy"]
    metric.reset()
    noisy = x[:20].clone()
    noisy[0, 0, 0, 0] = float("nan")  # non-finite samples count as wrong
    metric.update(generated=noisy, labels=(y[:20] + 1) % 10)
    assert metric.compute()["accuracy"] < 0.3
    protocol = metric.protocol()
    assert protocol["extractor"]["weights_sha256"] == result["sha256"]
    assert protocol["extractor"]["held_out_accuracy"] == result["accuracy"]
    json.dumps(protocol)


def test_class_accuracy_needs_labels_and_a_classifier(trained):
    metric = ClassAccuracy(str(trained[0]), device="cpu")
    with pytest.raises(ConfigError, match="labels=None"):
        metric.update(generated=torch.zeros(2, 1, 8, 8))
    with pytest.raises(DataError, match="0..9"):
        metric.update(generated=torch.zeros(2, 1, 8, 8), labels=torch.tensor([0, 10]))
    with pytest.raises(ConfigError, match="unfog train-classifier"):
        ClassAccuracy("")


def test_training_is_reproducible_and_holds_out_shapes_by_seed(tmp_path):
    cfg = {"dataset": {"_name_": "shapes", "size": 8, "length": 48}, "steps": 2, "batch_size": 16, "width": 4,
           "feature_dim": 8, "eval_samples": 16, "device": "cpu"}
    first, second = train_classifier(cfg, tmp_path / "a"), train_classifier(cfg, tmp_path / "b")
    assert first["sha256"] == second["sha256"]
    record = json.loads((tmp_path / "a" / RECORD_FILE).read_text())
    assert record["held_out"]["how"] == "seed=1000003" and record["held_out"]["n"] == 16
    assert record["num_classes"] == 18 and record["class_names"][0] == "red circle"
    assert ClassifierExtractor(tmp_path / "a").features(torch.zeros(3, 3, 8, 8)).shape == (3, 8)


@pytest.mark.parametrize(("dataset", "match"), [
    ({"_name_": "toy2d", "size": 64}, "sliced_wasserstein and mmd"),
    ({"_name_": "digits", "split": "all"}, "dataset.split=train"),
])
def test_training_refuses_unsuitable_datasets(dataset, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        train_classifier({"dataset": dataset, "steps": 1}, tmp_path)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="unknown setting.*stepz"):
        TrainSettings.from_config({"stepz": 3})
    with pytest.raises(ConfigError, match="steps"):
        TrainSettings.from_config({"steps": 0})


def test_the_hydra_config_composes_with_every_setting():
    from unfog.commands import load
    from unfog.commands.hydra_app import compose

    cfg = compose(load("train-classifier"), ["dataset=shapes", "dataset.max_objects=1"])
    assert cfg.dataset._name_ == "shapes" and cfg.dataset.max_objects == 1
    settings = TrainSettings.from_config(cfg)
    assert settings == TrainSettings()  # the YAML's defaults are the code's
