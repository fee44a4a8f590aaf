"""The distances of benchmarks/samplers.py: sliced W2 and RBF MMD on sets with known answers.

They are the `sliced_wasserstein` / `mmd` metrics' functions (unfog_metrics.toy2d_metrics),
tested here through the benchmark module, which imports them.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from unfog.errors import DataError

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "samplers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_samplers", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sliced_w2_of_a_set_with_itself_is_zero(bench):
    x = gaussian(500, 3, 0)
    assert bench.sliced_w2(x, x) == pytest.approx(0.0, abs=1e-12)
    assert bench.sliced_w2(x, x[torch.randperm(500)]) == pytest.approx(0.0, abs=1e-12)  # order is irrelevant


@pytest.mark.parametrize("shift", [0.5, 2.0])
def test_sliced_w2_of_a_shifted_copy_is_the_projected_shift(bench, shift):
    # Shifting by s along a coordinate moves each projection θ·x by s·θ₁, and E[θ₁²] = 1/d,
    # so SW2 = s/√d: the shift itself in 1-D, s/√2 in 2-D.
    for d in (1, 2):
        x = gaussian(500, d, 1)
        y = x.clone()
        y[:, 0] += shift
        assert bench.sliced_w2(x, y, projections=512) == pytest.approx(shift / math.sqrt(d), rel=0.05)


def test_sliced_w2_of_independent_shifted_gaussians_is_near_the_shift(bench):
    x, y = gaussian(2000, 1, 2), gaussian(2000, 1, 3) + 2.0
    assert bench.sliced_w2(x, y, projections=8) == pytest.approx(2.0, rel=0.05)


def test_sliced_w2_is_symmetric_and_scales_with_the_data(bench):
    x, y = gaussian(300, 4, 3), gaussian(300, 4, 4) + 1.0
    assert bench.sliced_w2(x, y) == pytest.approx(bench.sliced_w2(y, x), rel=1e-12)
    assert bench.sliced_w2(3 * x, 3 * y) == pytest.approx(3 * bench.sliced_w2(x, y), rel=1e-9)


def test_sliced_w2_refuses_sets_of_different_dimensions(bench):
    with pytest.raises(DataError, match="same dimension"):
        bench.sliced_w2(gaussian(10, 2, 0), gaussian(10, 3, 0))


def test_mmd_grows_with_the_shift_and_is_near_zero_without_one(bench):
    x = gaussian(300, 2, 5)
    h = bench.median_distance(x)
    bandwidths = (0.5 * h, h, 2 * h)
    values = []
    for shift in (0.0, 0.25, 0.5, 1.0, 2.0):
        y = gaussian(300, 2, 6)
        y[:, 0] += shift
        values.append(bench.mmd2(x, y, bandwidths))
    assert abs(values[0]) < 1e-2  # two samples of one distribution: unbiased MMD² ≈ 0
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[-1] > 0.1


def test_median_distance_of_two_points(bench):
    assert bench.median_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
