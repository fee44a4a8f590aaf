"""Sliced Wasserstein and MMD of 2-D points: known answers, and the fresh toy2d reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

import unfog
from unfog.errors import ConfigError, DataError
from unfog_datasets.toy2d import sample_toy2d
from unfog_metrics.toy2d_metrics import MMD, SlicedWasserstein, median_distance, mmd2, sliced_w2


def gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sliced_w2_of_a_set_with_itself_or_a_copy_of_it_is_zero():
    x = gaussian(400, 2, 0)
    assert sliced_w2(x, x[torch.randperm(400)]) == pytest.approx(0.0, abs=1e-12)
    assert sliced_w2(x, torch.cat([x, x])) == pytest.approx(0.0, abs=1e-12)  # same empirical distribution


def test_sliced_w2_of_a_shift_is_its_length_over_root_two():
    # A shift d moves each projection by d·θ, so W2²(θ) = (d·θ)²; over θ uniform on the circle
    # the mean of (d·θ)² is |d|²/2, so SW2 = |d|/√2 whatever the data.
    x = gaussian(300, 2, 1)
    d = torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert sliced_w2(x, x + d, projections=4096) == pytest.approx(math.sqrt(5 / 2), rel=0.02)


def test_sliced_w2_of_sets_of_different_sizes_is_the_quantile_integral():
    # 1-D, so the single direction is ±1: W2² between {0, 1} and {0, 0.5, 1} is the integral of
    # the squared quantile difference: 1/6·0 + 1/6·0.25 + 1/6·0.25 + 1/2·0 = 1/12.
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [0.5], [1.0]])
    assert sliced_w2(x, y, projections=3) == pytest.approx(math.sqrt(1 / 12), rel=1e-12)
    a, b = gaussian(600, 2, 2), gaussian(900, 2, 3) + torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert sliced_w2(a, b, projections=256) == pytest.approx(1.0, rel=0.1)  # shift √2, over √2


def test_sliced_w2_refuses_points_of_different_dimensions():
    with pytest.raises(DataError, match="same dimension"):
        sliced_w2(gaussian(10, 2, 0), gaussian(10, 3, 0))


def test_mmd2_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    x = gaussian(300, 2, 4)
    h = median_distance(x)
    values = [mmd2(x, gaussian(300, 2, 5) + torch.tensor([s, 0.0], dtype=torch.float64), (h / 2, h, 2 * h))
              for s in (0.0, 0.5, 1.0, 2.0)]
    assert abs(values[0]) < 5e-3
    assert all(a < b for a, b in zip(values, values[1:])), values


@pytest.fixture(scope="module")
def moons() -> dict:
    return {"_name_": "toy2d", "name": "two_moons", "size": 1500, "seed": 3}


def test_the_reference_is_fresh_points_of_the_training_distribution(moons):
    training = unfog.create("dataset", "toy2d", name="two_moons", size=1500, seed=3)
    metric = SlicedWasserstein(projections=128, reference_samples=1500)
    metric.set_reference(training, moons)
    reference = metric._reference
    assert reference.shape == (1500, 2)
    shared = (torch.cdist(reference, training.points.double()) < 1e-9).any()
    assert not shared  # no training point is in the reference
    metric.update(generated=training.points)
    close = metric.compute()["sw2"]
    metric.reset()  # forgets the samples, not the reference
    metric.update(generated=sample_toy2d("swiss_roll", 1500, 0))
    far = metric.compute()["sw2"]
    assert close < 0.05 and far > 5 * close, (close, far)
    protocol = metric.protocol()["reference"]
    assert protocol["fresh"] and protocol["distribution"] == "two_moons"
    assert protocol["seed"] == 3 + 1_000_003 and protocol["num"] == 1500
    assert protocol["dataset_config"] == {"_name_": "toy2d", "name": "two_moons", "size": 1500, "seed": 1_000_006}
    json.dumps(metric.protocol())


def test_mmd_metric_against_real_points_and_the_reference(moons):
    metric = unfog.create("metric", "mmd", reference_samples=800)
    assert isinstance(metric, MMD)
    metric.set_reference(unfog.create("dataset", "toy2d", name="two_moons", size=800, seed=3), moons)
    metric.update(generated=sample_toy2d("two_moons", 800, 7))
    same = metric.compute()
    metric.reset()
    metric.update(generated=sample_toy2d("two_moons", 800, 7) + 0.5)
    shifted = metric.compute()["mmd2"]
    assert abs(same["mmd2"]) < 5e-3 and shifted > 0.02 and same["n"] == 800
    args = metric.protocol()["arguments"]
    assert args["bandwidths"] == [0.5, 1.0, 2.0] and len(args["kernel_bandwidths"]) == 3
    metric.reset()  # real= replaces the reference until the next reset
    metric.update(generated=sample_toy2d("two_moons", 300, 7), real=sample_toy2d("two_moons", 300, 7))
    assert metric.compute()["mmd2"] < 0 and metric.protocol()["reference"]["source"] == "real"


def test_point_metrics_refuse_images_and_need_a_reference():
    metric = SlicedWasserstein()
    with pytest.raises(DataError, match="fid or kid"):
        metric.update(generated=torch.zeros(4, 1, 8, 8))
    metric.update(generated=torch.zeros(4, 2))
    with pytest.raises(DataError, match="set_reference"):
        metric.compute()
    metric.update(generated=torch.full((1, 2), float("nan")), real=torch.zeros(4, 2))
    assert metric.compute()["sw2"] == math.inf
    with pytest.raises(ConfigError, match="bandwidths"):
        MMD(bandwidths=(1.0, -1.0))
