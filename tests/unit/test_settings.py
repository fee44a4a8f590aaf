"""Every config node refuses a wrong type or an out-of-range value when the config is composed
and checked, before anything is built, with one line naming the key and what is allowed."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from unfog.commands import conf_dir
from unfog.config import register_configs
from unfog.errors import ConfigError
from unfog.schemas import EvaluateConfig, SampleConfig, SamplingSettings, TrainConfig, check_config

SCHEMAS = {"train": TrainConfig, "sample": SampleConfig, "evaluate": EvaluateConfig}
NEEDS = {"train": [], "sample": ["checkpoint=x.ckpt"], "evaluate": ["checkpoint=x.ckpt"]}


def _check(command: str, *overrides: str) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name=command, overrides=[*NEEDS[command], *overrides])
    check_config(cfg, SCHEMAS[command])


BAD = [
    # train: every node of the root config
    ("train", "data.batch_size=0", "data.batch_size=0 is out of range: it must be at least 1"),
    ("train", "data.num_workers=-1", "data.num_workers=-1 is out of range"),
    ("train", "optim.lr=-1", "optim.lr=-1.0 is out of range: it must be greater than 0"),
    ("train", "optim.lr=0", "optim.lr=0.0 is out of range"),
    ("train", "optim.weight_decay=-0.1", "optim.weight_decay=-0.1 is out of range"),
    ("train", "optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5]: AdamW's betas are two numbers in [0, 1)"),
    ("train", "optim.warmup_steps=-10", "optim.warmup_steps=-10 is out of range"),
    ("train", "ema.decay=1.5", "ema.decay=1.5 is out of range: it must be in [0.0, 1.0]"),
    ("train", "loss.min_snr_gamma=0", "loss.min_snr_gamma=0.0 is out of range"),
    ("train", "loss.offset_noise=-0.1", "loss.offset_noise=-0.1 is out of range"),
    ("train", "sampling.guidance=-2", "sampling.guidance=-2 is not a guidance scale"),
    ("train", "sampling.guidance=nan", "sampling.guidance=nan is not a guidance scale"),
    ("train", "sampling.guidance={class_label: -1}", "sampling.guidance.class_label=-1 is not a guidance scale"),
    ("train", "sampling.guidance_rescale=7", "sampling.guidance_rescale=7.0 is out of range: it must be in [0.0, 1.0]"),
    ("train", "sampling.guidance_interval=[5,1]", "sampling.guidance_interval=[5.0, 1.0] is not a noise-level"),
    ("train", "sampling.batch_size=0", "sampling.batch_size=0 is out of range"),
    ("train", "sampling.num_samples=-4", "sampling.num_samples=-4 is out of range"),
    ("train", "sampling.every_n_steps=-1", "sampling.every_n_steps=-1 is out of range"),
    ("train", "sampling.seed=-3", "sampling.seed=-3 is out of range"),
    ("train", "evaluation.num_samples=-1", "evaluation.num_samples=-1 is out of range"),
    ("train", "evaluation.batch_size=0", "evaluation.batch_size=0 is out of range"),
    ("train", "checkpoint.every_n_steps=0", "checkpoint.every_n_steps=0 is out of range"),
    ("train", "seed=-1", "seed=-1 is out of range"),
    ("train", "sigma_data=0", "sigma_data=0.0 is out of range"),
    ("train", "+surprise=1", "surprise is not a setting here"),
    ("train", "+data.batchsize=3", "data.batchsize is not a setting here. Did you mean data.batch_size?"),
    # the trainer node, against lightning.Trainer's own annotations
    ("train", "trainer.max_steps=abc", "trainer.max_steps='abc': lightning.Trainer's max_steps takes an integer"),
    ("train", "trainer.max_steps=2.5", "trainer.max_steps=2.5: lightning.Trainer's max_steps takes an integer"),
    ("train", "trainer.max_steps=-5", "trainer.max_steps=-5 is out of range: it must be at least -1"),
    ("train", "trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 is out of range"),
    ("train", "trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1 is out of range"),
    ("train", "trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 is out of range"),
    ("train", "trainer.precision=17", "trainer.precision=17: lightning.Trainer's precision takes one of"),
    ("train", "trainer.enable_progress_bar=maybe", "trainer.enable_progress_bar='maybe'"),
    ("train", "trainer.num_nodes=0", "trainer.num_nodes=0 is out of range"),
    ("train", "trainer.devices=[a]", "trainer.devices=['a']: lightning.Trainer's devices takes"),
    ("train", "trainer.compile=7", "trainer.compile=7: lightning.Trainer's compile takes true or false or a string"),
    # sample and evaluate share the sampling settings
    ("sample", "num_samples=0", "num_samples=0 is out of range"),
    ("sample", "batch_size=-1", "batch_size=-1 is out of range"),
    ("sample", "guidance=-1", "guidance=-1 is not a guidance scale"),
    ("sample", "guidance=auto", "guidance='auto' is not a guidance scale"),
    ("sample", "guidance_rescale=2", "guidance_rescale=2.0 is out of range"),
    ("sample", "guidance_interval=[1]", "guidance_interval=[1.0] is not a noise-level interval"),
    ("sample", "labels=[1,-2]", "labels=[1, -2]: labels are class numbers"),
    ("sample", "seed=-5", "seed=-5 is out of range"),
    ("evaluate", "num_samples=0", "num_samples=0 is out of range"),
    ("evaluate", "guidance_rescale=-0.5", "guidance_rescale=-0.5 is out of range"),
]


@pytest.mark.parametrize("command, override, says", BAD, ids=[f"{c}:{o}" for c, o, _ in BAD])
def test_a_bad_value_is_refused_naming_the_key(command: str, override: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        _check(command, override)
    assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("command, overrides", [
    ("train", []), ("train", ["sampling.guidance={class_label: 3}", "sampling.guidance_interval=[0.3,5]"]),
    ("train", ["trainer.max_steps=-1", "trainer.devices=auto", "trainer.precision=bf16-mixed", "trainer.compile=true"]),
    ("sample", ["guidance=0", "labels=[0,1]"]), ("evaluate", ["guidance=3", "guidance_rescale=0.7"]),
])
def test_good_values_pass(command: str, overrides: list[str]) -> None:
    _check(command, *overrides)


def test_sampling_settings_check_themselves_wherever_they_come_from() -> None:
    assert SamplingSettings.of({"guidance": 2, "seed": 3, "every_n_steps": 5}).seed == 3
    with pytest.raises(ConfigError, match="guidance_rescale=3 is out of range"):
        SamplingSettings.of({"guidance_rescale": 3})


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "euler_ancestral", "heun", "dpm_solver_pp", "unipc"])
def test_every_sampler_refuses_a_step_count_below_one(name: str) -> None:
    import unfog

    with pytest.raises(ConfigError, match=f"{name}: steps must be at least 1; got -3"):
        unfog.create("sampler", name, steps=-3)
