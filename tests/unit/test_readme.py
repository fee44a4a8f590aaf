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


def test_readme_commands_compose_and_validate() -> None:
    """Every `unfog train`, `train-classifier`, `train-autoencoder` and `evaluate` line of the quickstart is a valid
    config (sweeps: each first value)."""
    import shlex

    from unfog.building import validate
    from unfog.commands import load, split_metrics
    from unfog.commands.hydra_app import compose
    from unfog.schemas import EvaluateConfig, TrainConfig, check_config

    block = re.search(r"## Quickstart\n\n```bash\n(.*?)```", README.read_text(), re.S).group(1)
    block = block.replace("\\\n", " ")  # continued lines
    lines = [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line.startswith("unfog ")]
    names = ("train", "train-classifier", "train-autoencoder", "evaluate")
    chosen = [words for words in lines if words[1] in names]
    assert sum(words[1] == "train" for words in chosen) >= 5 and {w[1] for w in chosen} == set(names)
    for words in chosen:
        command = load(words[1])
        args = [a for a in words[2:] if a != "-m" and not a.startswith("ckpt_path=")]
        if command.metric_lists:
            args = split_metrics(args)
        else:
            args = [a.split(",")[0] if "=" in a and "[" not in a else a for a in args]
        cfg = compose(command, args)
        schema = {"train": TrainConfig, "evaluate": EvaluateConfig}.get(words[1], command.schema)
        if schema is not None:
            check_config(cfg, schema)
        if words[1] == "train":
            validate(cfg)
