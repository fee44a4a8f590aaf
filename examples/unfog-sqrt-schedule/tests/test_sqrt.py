"""The plugin passes unfog's contract suite for schedules, plus its own check."""

import torch

import unfog
from unfog.testing import ScheduleContract


class TestSqrtSchedule(ScheduleContract):
    key = "sqrt"


def test_follows_the_formula_on_the_grid() -> None:
    s = unfog.create("schedule", "sqrt", num_timesteps=100)
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    expected = (1 - torch.sqrt(t + 1e-4)) / (1 - 1e-4**0.5)
    torch.testing.assert_close(s.alpha(t) ** 2, expected, rtol=1e-9, atol=1e-9)
