"""The digits_classifier metric: a classifier of real digits scoring (here, real) samples."""

from __future__ import annotations

import pytest
import torch

import unfog
from unfog.errors import ConfigError, DataError
from unfog.protocols import Metric
from unfog_datasets.digits import digits_split
from unfog_metrics.digits_classifier import trained_digits_classifier


@pytest.fixture(scope="module")
def metric():
    return unfog.create("metric", "digits_classifier")


def test_classifier_is_accurate_and_cached(metric):
    assert isinstance(metric, Metric)
    assert metric.classifier_test_accuracy >= 0.97
    again = unfog.create("metric", "digits_classifier")
    assert again._classifier is metric._classifier  # not retrained
    assert trained_digits_classifier(0.2)[0] is metric._classifier


def test_real_test_digits_score_high(metric):
    x, y = digits_split("test")
    metric.reset()
    metric.update(generated=x[:200], labels=y[:200])
    metric.update(generated=x[200:], labels=y[200:], real=x)  # real is accepted and ignored
    result = metric.compute()
    assert set(result) == {"accuracy", "per_class_min", "n"}
    assert all(isinstance(v, float) for v in result.values())
    assert result["n"] == 360.0
    assert result["accuracy"] > 0.95
    assert result["accuracy"] == pytest.approx(metric.classifier_test_accuracy)
    assert 0.8 < result["per_class_min"] <= result["accuracy"]


def test_noise_scores_near_chance(metric):
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(500, 1, 8, 8, generator=gen) * 2 - 1
    labels = torch.randint(0, 10, (500,), generator=gen)
    metric.reset()
    metric.update(generated=noise, labels=labels)
    assert metric.compute()["accuracy"] < 0.3


def test_wrong_labels_score_low_and_reset_forgets(metric):
    x, y = digits_split("test")
    metric.reset()
    metric.update(generated=x, labels=(y + 1) % 10)
    assert metric.compute()["accuracy"] < 0.05
    metric.reset()
    with pytest.raises(DataError, match="no samples"):
        metric.compute()


def test_upscaled_and_non_finite_samples(metric):
    ds = unfog.create("dataset", "digits", split="test", upscale=2)
    metric.reset()
    metric.update(generated=ds.images, labels=ds.labels)
    assert metric.compute()["accuracy"] == pytest.approx(metric.classifier_test_accuracy)
    x, y = digits_split("test")
    x = x[:10].clone()
    x[0, 0, 0, 0] = float("nan")
    assert int(metric.predict(x)[0]) == -1  # a broken sample counts as wrong
    metric.reset()
    metric.update(generated=x, labels=y[:10])
    assert metric.compute()["accuracy"] <= 0.9


def test_missing_or_bad_inputs_raise(metric):
    x, y = digits_split("test")
    with pytest.raises(ConfigError, match="labels=None"):
        metric.update(generated=x)
    with pytest.raises(DataError, match="N×1×8×8"):
        metric.update(generated=torch.zeros(4, 3, 32, 32), labels=y[:4])
    with pytest.raises(DataError, match="labels"):
        metric.update(generated=x[:4], labels=y[:3])
    with pytest.raises(DataError, match="0..9"):
        metric.update(generated=x[:2], labels=torch.tensor([0, 10]))
    with pytest.raises(ConfigError, match="test_fraction"):
        unfog.create("metric", "digits_classifier", test_fraction=0.0)
