"""Sample grids are written at a size a person can see."""

from __future__ import annotations

import numpy as np
import torch

from unfog.images import picture, visible


def test_small_grids_are_enlarged_by_whole_pixels_to_256_across() -> None:
    digits = picture(torch.rand(80, 1, 8, 8) * 2 - 1, nrow=10)  # the digits grid: 91 pixels across
    big = visible(digits)
    assert big.shape[1] >= 256 and big.shape[1] % digits.shape[1] == 0
    factor = big.shape[1] // digits.shape[1]
    np.testing.assert_array_equal(big[::factor, ::factor], digits)  # each pixel a block, no smoothing
    assert len(np.unique(big)) == len(np.unique(digits))


def test_a_grid_already_wide_enough_is_left_alone() -> None:
    wide = np.zeros((300, 400, 3), np.uint8)
    assert visible(wide) is wide
