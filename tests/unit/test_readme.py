"""The README's ten-line plugin works as printed."""

import re
from pathlib import Path

import torch

import unfog
from unfog import registry
from unfog.testing import gaussian_denoiser

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_plugin_example_registers_and_samples() -> None:
    code = re.search(r"```python\n(# my_sampler/__init__.py.*?)```", README.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 11
    with registry.isolated():
        exec(compile(code, "README.md", "exec"), {})
        sampler = unfog.create("sampler", "x0_jump", clip=False)
        schedule = unfog.create("schedule", "cosine")
        out = sampler.sample(gaussian_denoiser(schedule), torch.randn(5, 2))
        assert out.shape == (5, 2) and torch.allclose(out, torch.full_like(out, 0.5), atol=0.05)
