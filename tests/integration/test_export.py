"""Interop with diffusers: its models as backbones, and ``unfog export`` as safetensors or as a
diffusers pipeline that reproduces unfog's samples for the same noise.

The pipelines are built directly (random weights: the comparisons are of arithmetic, not of
quality) and the exporters called directly; one slow test runs the real command line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")

import unfog  # noqa: E402
import unfog_diffusers.models as dm  # noqa: E402
from unfog import registry  # noqa: E402
from unfog.building import build_model  # noqa: E402
from unfog.config import build  # noqa: E402
from unfog.diffusion import SeededNoise  # noqa: E402
from unfog.errors import CheckpointError, ConfigError, UnfogError  # noqa: E402
from unfog.export import export  # noqa: E402
from unfog.pipeline import DiffusionPipeline, Pipeline  # noqa: E402
from unfog.schemas import SamplingSettings  # noqa: E402
from unfog.testing import BackboneContract  # noqa: E402

SHAPE = (1, 8, 8)
DIFFUSERS_UNET = {"_name_": "diffusers_unet", "block_out_channels": [16, 32]}
UNET_TINY = {"_name_": "unet", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
             "dropout": 0.0, "groups": 8}  # conf/backbone/unet_tiny.yaml
LABELS = {"class_label": {"_name_": "class_label", "dim": 16}}
SCHEDULERS = {"dpm_solver_pp": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
              "euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler",
              "euler_ancestral": "EulerAncestralDiscreteScheduler"}
# numpy 2 warns inside diffusers' schedulers when they build their sigmas
ARRAY_WARNING = "ignore:__array__ implementation:DeprecationWarning"


def _pipeline(backbone: dict[str, Any] = DIFFUSERS_UNET, conditioners: dict[str, Any] | None = None,
              schedule: dict[str, Any] | None = None, prediction: str = "eps",
              data_range: tuple[float, float] = (-1, 1), source: str | None = None) -> DiffusionPipeline:
    """A pipeline with random weights, as ``Pipeline.load`` builds one from a checkpoint."""
    cfg = {"backbone": backbone, "conditioners": conditioners or {}, "schedule": schedule or {"_name_": "cosine"},
           "prediction": prediction, "sampler": {"_name_": "ddim", "steps": 4}}
    torch.manual_seed(0)
    model = build_model(cfg, SHAPE, 10 if conditioners else None).eval()
    return DiffusionPipeline(model, build("schedule", cfg["schedule"]), prediction, data_shape=SHAPE,
                             data_range=data_range, config=cfg, versions={"unfog": "0.1.0"}, source=source)


def _export(pipeline: DiffusionPipeline, out: Path, sampler: str | None = None, clip: bool = True,
            **settings: Any) -> Path:
    exporter = unfog.create("exporter", "diffusers", clip=clip)
    return exporter.export(pipeline, out, unfog.create("sampler", sampler, **settings) if sampler else None)


def _record(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "unfog.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one thread is ~100x faster than two contending."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def unconditional() -> DiffusionPipeline:
    """An unconditional diffusers_unet on the cosine schedule (T = 1000), random weights."""
    return _pipeline()


def _unet_folder(root: Path, data_shape: tuple[int, ...] = SHAPE, cond_dim: int = 0, context_dim: int = 0,
                 cond_channels: int = 0, **config) -> Path:
    """A tiny diffusers U-Net saved with save_pretrained, made to take the given wiring: a
    UNet2DConditionModel for tokens, else a UNet2DModel; vector conditioning through
    simple_projection / identity class embeddings."""
    import diffusers

    torch.manual_seed(0)
    common = dict(sample_size=data_shape[1], in_channels=data_shape[0] + cond_channels, out_channels=data_shape[0],
                  block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
    if context_dim:
        model = diffusers.UNet2DConditionModel(
            **common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=context_dim, attention_head_dim=2,
            class_embed_type="simple_projection" if cond_dim else None,
            projection_class_embeddings_input_dim=cond_dim or None, **config,
        )
    else:
        config = {"class_embed_type": "identity"} | config if cond_dim else config
        model = diffusers.UNet2DModel(**common, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), **config)
    model.save_pretrained(root, safe_serialization=True)
    return root


# (a) the exported pipeline reproduces unfog's DDIM and DDPM samples ------------------------------------------

EXACT = {"ddim": {}, "ddim-eta": {"eta": 0.5}, "ddim-trailing": {"spacing": "trailing"},
         "ddpm": {}, "ddpm-large": {"variance": "large", "spacing": "linspace"}}


@pytest.mark.parametrize("case", list(EXACT))
def test_diffusers_pipeline_reproduces_unfog_samples(unconditional: DiffusionPipeline, tmp_path: Path,
                                                     case: str) -> None:
    import diffusers

    name, settings = case.split("-")[0], EXACT[case]
    steps, n, seed = 10, 6, 3
    folder = _export(unconditional, tmp_path / "pipe", name, steps=steps, **settings)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(folder.rglob("*.bin")), "weights must be safetensors only"
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    schedule = unconditional.schedule
    assert type(pipe).__name__ == {"ddim": "DDIMPipeline", "ddpm": "DDPMPipeline"}[name]
    sched = pipe.scheduler.config
    assert sched.trained_betas == schedule.betas.tolist()  # unfog's betas, exactly
    assert (sched.prediction_type, sched.clip_sample, sched.clip_sample_range) == ("epsilon", True, 1.0)
    sampler = unfog.create("sampler", name, steps=steps, **settings)
    record = _record(folder)
    call = record["pipeline_call"]
    assert call["num_inference_steps"] == steps and record["exact"] is True

    # 1. unet + scheduler driven by hand from unfog's own initial noise (σ(1)·ε) and step noise
    ours = unconditional.generate(sampler, n, settings=SamplingSettings(seed=seed, clip=True))
    rng = SeededNoise.for_indices(seed, range(n))
    sigma_1 = float(schedule.sigma(torch.tensor([1.0], dtype=torch.float64))[0])
    x = sigma_1 * rng.randn_like(torch.empty(n, *SHAPE))
    pipe.scheduler.set_timesteps(steps)
    extra = {k: v for k, v in call.items() if k != "num_inference_steps"}
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(pipe.unet(x, t).sample, t, x, generator=rng.generators, **extra).prev_sample
    loop_diff = (x - ours).abs().max().item()
    # measured: 7e-7 to 2.4e-6 (DDIM) and 3e-6 to 7e-6 (DDPM); both in float32, diffusers' ᾱ by a float32 cumprod
    assert loop_diff < 1e-4, loop_diff
    assert 0.05 < (ours.abs() < 0.999).float().mean()  # not a comparison of clipped constants

    # 2. the pipeline's own __call__, seeded per sample as unfog seeds its streams; diffusers starts
    #    from plain ε, so unfog's sampler is run from the same ε
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + k) for k in range(n)]
    images = pipe(batch_size=n, generator=gens, output_type="pt", **call).images
    rng = SeededNoise.for_indices(seed, range(n))
    noise = rng.randn_like(torch.empty(n, *SHAPE))
    with torch.no_grad():
        denoiser = unconditional.model.denoiser(schedule, "eps", None, n, clip=(-1.0, 1.0))
        same = sampler.sample(denoiser, noise, rng)
    pipe_diff = (images * 2 - 1 - same).abs().max().item()  # the pipeline returns x/2 + 1/2 in [0, 1]
    assert pipe_diff < 1e-4, pipe_diff


@pytest.mark.filterwarnings(ARRAY_WARNING)
def test_other_samplers_map_to_their_diffusers_schedulers(unconditional: DiffusionPipeline, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    import diffusers

    for name, cls in SCHEDULERS.items():
        with caplog.at_level(logging.WARNING, logger="unfog"):
            caplog.clear()
            folder = _export(unconditional, tmp_path / name, name)
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "DDPMPipeline" and index["scheduler"] == ["diffusers", cls], name
        scheduler = getattr(diffusers, cls).from_pretrained(folder / "scheduler")
        assert scheduler.config.trained_betas == unconditional.schedule.betas.tolist()
        record, readme = _record(folder), (folder / "README.md").read_text()
        assert record["exact"] is False and record["scheduler"] == cls
        assert "is diffusers' implementation of the method, not step for step unfog's" in readme
        scaled = name in ("euler", "heun", "euler_ancestral")
        assert ("scale_model_input" in readme) == scaled, name
        assert any("needs scale_model_input" in r.getMessage() for r in caplog.records) == scaled, name


def test_an_inexact_ddim_export_says_so(unconditional: DiffusionPipeline, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="unfog"):
        folder = _export(unconditional, tmp_path / "pipe", "ddim", steps=7, spacing="trailing")  # 1000 % 7 != 0
    assert _record(folder)["exact"] is False
    assert "takes steps close to, not equal to, unfog's" in (folder / "README.md").read_text()
    assert any("the export is close, not exact" in r.getMessage() for r in caplog.records)


def test_the_record_and_readme(tmp_path: Path) -> None:
    import diffusers

    source = tmp_path / "run.ckpt"
    folder = _export(_pipeline(source=str(source)), tmp_path / "pipe", "ddim", clip=False, steps=5)
    record = _record(folder)
    assert record["format"] == "diffusers" and record["scheduler"] == "DDIMScheduler"
    assert record["sampler"] == {"_name_": "ddim", "steps": 5, "eta": 0.0, "spacing": None}
    assert record["pipeline_call"] == {"num_inference_steps": 5, "eta": 0.0, "use_clipped_model_output": False}
    assert record["source_checkpoint"] == str(source.resolve()) and record["ema"] is True
    assert record["exported_by"]["diffusers"] == diffusers.__version__ and record["versions"] == {"unfog": "0.1.0"}
    assert record["config"]["backbone"] == DIFFUSERS_UNET and record["wiring"]["data_shape"] == list(SHAPE)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["clip_sample"] is False  # clip=false
    readme = (folder / "README.md").read_text()
    assert "pipe(batch_size=4, num_inference_steps=5, eta=0.0, use_clipped_model_output=False)" in readme
    assert "takes the same steps as unfog's `ddim`" in readme


def test_without_a_sampler_the_trained_one_is_used(unconditional: DiffusionPipeline, tmp_path: Path) -> None:
    record = _record(_export(unconditional, tmp_path / "pipe"))
    assert record["sampler"]["_name_"] == "ddim" and record["pipeline_call"]["num_inference_steps"] == 4


def test_unfog_export_loads_the_model_and_builds_the_exporter(unconditional: DiffusionPipeline, tmp_path: Path) -> None:
    import diffusers

    saved = unconditional.save(tmp_path / "model")  # an export folder is a checkpoint Pipeline.load reads
    folder = export({"checkpoint": str(saved), "format": {"_name_": "diffusers"},
                     "sampler": {"_name_": "ddpm", "steps": 5}, "output_dir": str(tmp_path / "pipe")})
    assert folder == tmp_path / "pipe"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").state_dict()
    ours = unconditional.model.backbone.diffusers_model.state_dict()
    assert unet.keys() == ours.keys() and all(torch.equal(unet[k], v) for k, v in ours.items())
    assert _record(folder)["source_checkpoint"] == str(saved.resolve())
    with pytest.raises(UnfogError, match="onnx"):
        export({"checkpoint": str(saved), "format": {"_name_": "onnx"}, "output_dir": str(tmp_path / "x")})


# (b) safetensors export of any backbone ------------------------------------------------------------------

@pytest.fixture(scope="module")
def labelled() -> DiffusionPipeline:
    """unfog's own class-conditional unet_tiny, random weights."""
    return _pipeline(UNET_TINY, LABELS)


def test_safetensors_export_samples_like_the_pipeline(labelled: DiffusionPipeline, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = unfog.create("exporter", "safetensors").export(labelled, tmp_path / "export", None)
    state = load_file(str(folder / "model.safetensors"))
    ours = labelled.model.state_dict()
    assert state.keys() == ours.keys() and all(torch.equal(state[k], v) for k, v in ours.items())
    record = _record(folder)
    assert record["config"] == labelled.config and record["wiring"] == labelled.wiring
    assert record["versions"] == {"unfog": "0.1.0"} and len(record["sha256"]) == 64
    loaded = Pipeline.load(folder)
    assert torch.equal(loaded.schedule.betas, labelled.schedule.betas)
    sampler = unfog.create("sampler", "ddim", steps=3)
    kwargs = dict(values={"label": torch.arange(5)}, settings=SamplingSettings(guidance=2.0, seed=1))
    assert torch.equal(labelled.generate(sampler, 5, **kwargs), loaded.generate(sampler, 5, **kwargs))


def test_a_changed_export_is_refused(labelled: DiffusionPipeline, tmp_path: Path) -> None:
    folder = unfog.create("exporter", "safetensors").export(labelled, tmp_path / "export", None)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        Pipeline.load(folder)
    with pytest.raises(CheckpointError, match="not an unfog export"):
        Pipeline.load(tmp_path)


# (c) the real command line ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_trains_and_exports_a_diffusers_unet(tmp_path: Path) -> None:
    """``unfog train`` a tiny diffusers_unet, ``unfog export`` it as diffusers and as safetensors,
    and ``unfog sample`` from the safetensors export."""
    import numpy as np
    from _cli import TINY, run

    env = {"OMP_NUM_THREADS": "1"}
    tiny = [o for o in TINY if not o.startswith(("backbone=", "sampling.num_samples="))]
    out = run("train", *tiny, "backbone=diffusers_unet", "backbone.block_out_channels=[16,32]", "~conditioner",
              "sampling.guidance=1", "sampling.num_samples=0", "trainer.max_steps=2", f"hydra.run.dir={tmp_path}",
              cwd=tmp_path, env=env)
    assert "trained 2 steps" in out.stdout
    ckpt = f"checkpoint={tmp_path / 'checkpoints' / 'last.ckpt'}"
    out = run("export", ckpt, "format=diffusers", "format.clip=false", "sampler=ddpm", "sampler.steps=5",
              f"output_dir={tmp_path / 'pipe'}", f"hydra.run.dir={tmp_path / 'export1'}", cwd=tmp_path, env=env)
    assert f"as diffusers to {tmp_path / 'pipe'}" in out.stdout
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())["clip_sample"] is False
    assert _record(tmp_path / "pipe")["exact"] is True
    run("export", ckpt, "format=safetensors", f"output_dir={tmp_path / 'export'}",
        f"hydra.run.dir={tmp_path / 'export2'}", cwd=tmp_path, env=env)
    run("sample", f"checkpoint={tmp_path / 'export'}", "num_samples=4", "sampler.steps=2",
        f"output_dir={tmp_path / 'samples'}", cwd=tmp_path, env=env)
    assert np.load(tmp_path / "samples" / "samples.npz")["samples"].shape == (4, *SHAPE)


# (d) a diffusers model folder as the backbone ---------------------------------------------------------------

def test_diffusers_folder_trains_from_the_saved_weights(tmp_path: Path) -> None:
    import diffusers

    folder = _unet_folder(tmp_path / "unet")
    net = unfog.create("backbone", "diffusers_folder", data_shape=SHAPE, path=str(folder))
    saved = diffusers.UNet2DModel.from_pretrained(folder).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in net.diffusers_model.state_dict().items())
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2)
    x, eps, t = torch.randn(4, *SHAPE), torch.randn(4, *SHAPE), torch.rand(4)
    losses = []
    for _ in range(2):
        loss = (net(x, t, {}) - eps).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]


def test_diffusers_folder_refuses_a_missing_or_mismatched_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        unfog.create("backbone", "diffusers_folder", data_shape=SHAPE, path=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no config.json"):
        unfog.create("backbone", "diffusers_folder", data_shape=SHAPE, path=str(tmp_path))
    folder = _unet_folder(tmp_path / "unet")
    with pytest.raises(ConfigError, match=r"1 input and 1 output channels at sample_size 8.*\(3, 16, 16\)"):
        unfog.create("backbone", "diffusers_folder", data_shape=(3, 16, 16), path=str(folder))
    with pytest.raises(ConfigError, match="vector conditioning of width 5 needs"):
        unfog.create("backbone", "diffusers_folder", data_shape=SHAPE, path=str(folder), cond_dim=5)


# (e) clear errors -----------------------------------------------------------------------------------------

class JumpToX0:
    """A sampler with no diffusers counterpart: one jump from noise to x̂₀."""

    def __init__(self, steps: int = 1) -> None:
        self.steps = steps

    def sample(self, denoiser: Any, noise: torch.Tensor, rng: Any = None) -> torch.Tensor:
        return denoiser(noise, 1.0).x0


@pytest.mark.filterwarnings(ARRAY_WARNING)
def test_export_errors_say_what_to_do(unconditional: DiffusionPipeline, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="backbone=diffusers_unet.*'unet'.*format=safetensors"):
        _export(_pipeline(UNET_TINY), tmp_path / "a", "ddim")
    flow = DiffusionPipeline(unconditional.model, unconditional.schedule, "flow", data_shape=SHAPE,
                             data_range=(-1, 1), config=unconditional.config)
    with pytest.raises(ConfigError, match="predicts 'flow'.*format=safetensors"):
        _export(flow, tmp_path / "b", "ddim")
    with registry.isolated():
        registry.register("sampler", "x0_jump")(JumpToX0)
        with pytest.raises(ConfigError, match="sampler 'x0_jump' has no diffusers scheduler; .*ddim, ddpm"):
            _export(unconditional, tmp_path / "c", "x0_jump")
    with pytest.raises(ConfigError, match="spacing=karras has no counterpart"):
        _export(unconditional, tmp_path / "d", "ddim", spacing="karras")
    with pytest.raises(ConfigError, match="needs a discrete schedule.*'rectified_flow'.*format=safetensors"):
        _export(_pipeline(schedule={"_name_": "rectified_flow"}, prediction="eps"), tmp_path / "e", "ddim")
    short = _pipeline(schedule={"_name_": "linear", "num_timesteps": 100})
    with pytest.raises(ConfigError, match="1000-step schedule, but the schedule has T = 100.*num_train_timesteps=100"):
        _export(short, tmp_path / "f", "ddim")
    labelled = _pipeline(conditioners=LABELS)
    with pytest.raises(ConfigError, match="unconditional UNet2DModel.*conditioners \\['class_label'\\]"):
        _export(labelled, tmp_path / "g", "ddim")
    with pytest.raises(ConfigError, match=r"data range is \[0.0, 1.0\]; export with clip=false"):
        _export(_pipeline(data_range=(0, 1)), tmp_path / "h", "ddim")
    assert not [p.name for p in tmp_path.iterdir()]  # nothing is written before the checks pass
    assert _export(_pipeline(data_range=(0, 1)), tmp_path / "i", "ddim", clip=False).is_dir()


def test_missing_diffusers_says_how_to_install(unconditional: DiffusionPipeline, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'unfog\[diffusers\]'"):
        unfog.create("backbone", "diffusers_unet", data_shape=SHAPE)
    with pytest.raises(ConfigError, match=r"format=diffusers needs diffusers.*pip install 'unfog\[diffusers\]'"):
        _export(unconditional, tmp_path / "pipe", "ddim")


# (f) the wrappers, unit level -----------------------------------------------------------------------------

def test_timestep_is_diffusers_index_of_the_same_grid_point() -> None:
    i = torch.arange(1, 1001)
    t = (i.to(torch.float32) / 1000)  # how unfog's schedules and samplers give t = i/T
    assert torch.equal(dm.diffusers_timestep(t, 1000), (i - 1).to(torch.float32))
    assert torch.equal(dm.diffusers_timestep(torch.arange(1, 101) / 100, 100), torch.arange(0, 100).float())


ROUTES = {"vector": {"cond_dim": 5}, "tokens": {"context_dim": 12}, "concat": {"cond_channels": 2}}


def _cond(wiring: dict[str, int], n: int = 3) -> dict[str, torch.Tensor]:
    cond = {}
    if wiring.get("cond_dim"):
        cond["vector"] = torch.randn(n, wiring["cond_dim"])
    if wiring.get("context_dim"):
        cond["tokens"] = torch.randn(n, 4, wiring["context_dim"])
    if wiring.get("cond_channels"):
        cond["concat"] = torch.randn(n, wiring["cond_channels"], 8, 8)
    return cond


@pytest.mark.parametrize("key", ["diffusers_unet", "diffusers_transformer", "diffusers_folder"])
def test_each_declared_route_builds_and_runs(key: str, tmp_path: Path) -> None:
    assert unfog.get("backbone", key).module == "unfog_diffusers.models"
    routes = unfog.get("backbone", key).obj.routes
    combos = [{}] + [ROUTES[r] for r in routes] + [{k: v for r in routes for k, v in ROUTES[r].items()}]
    for n, wiring in enumerate(combos):
        extra = {"block_out_channels": (16, 32)} if key == "diffusers_unet" else {}
        if key == "diffusers_folder":
            extra = {"path": str(_unet_folder(tmp_path / str(n), **wiring))}
        net = unfog.create("backbone", key, data_shape=SHAPE, **wiring, **extra)
        x = torch.randn(3, *SHAPE)
        out = net(x, torch.rand(3), _cond(wiring))
        assert out.shape == x.shape and torch.isfinite(out).all(), (key, wiring)
    unet = unfog.create("backbone", "diffusers_unet", data_shape=SHAPE, block_out_channels=(16, 32), context_dim=12)
    assert unet.diffusers_class == "UNet2DConditionModel" and unet.diffusers_config["cross_attention_dim"] == 12


def test_folder_with_a_class_embedding_runs_without_conditioning(tmp_path: Path) -> None:
    folder = _unet_folder(tmp_path / "a", class_embed_type="identity")  # takes a vector, here none: zeros
    net = unfog.create("backbone", "diffusers_folder", data_shape=SHAPE, path=str(folder))
    x, t = torch.randn(2, *SHAPE), torch.rand(2)
    plain = net.diffusers_model(x, dm.diffusers_timestep(t, 1000), class_labels=torch.zeros(2, 64)).sample
    assert torch.equal(net(x, t, {}), plain)
    with pytest.raises(ConfigError, match="embeds class ids itself"):
        unfog.create("backbone", "diffusers_folder", data_shape=SHAPE,
                     path=str(_unet_folder(tmp_path / "b", num_class_embeds=10)))
    with pytest.raises(ConfigError, match="needs a token conditioner of that width"):
        unfog.create("backbone", "diffusers_folder", data_shape=SHAPE,
                     path=str(_unet_folder(tmp_path / "c", context_dim=6)))


def test_wrappers_refuse_what_they_cannot_build() -> None:
    with pytest.raises(ConfigError, match="divisible by 4"):
        unfog.create("backbone", "diffusers_unet", data_shape=(1, 6, 6), block_out_channels=(8, 8, 8))
    with pytest.raises(ConfigError, match="norm_num_groups=8"):
        unfog.create("backbone", "diffusers_unet", data_shape=SHAPE, block_out_channels=(12, 16))
    with pytest.raises(ConfigError, match="no cross-attention"):
        unfog.create("backbone", "diffusers_transformer", data_shape=SHAPE, context_dim=4)
    with pytest.raises(ConfigError, match="square images"):
        unfog.create("backbone", "diffusers_transformer", data_shape=(1, 8, 4))


class TestDiffusersUNetContract(BackboneContract):
    key = "diffusers_unet"
    kwargs = {"block_out_channels": (16, 32)}


class TestDiffusersTransformerContract(BackboneContract):
    key = "diffusers_transformer"


class TestDiffusersFolderContract(BackboneContract):
    key = "diffusers_folder"

    def build(self, **extra):
        import tempfile

        wiring = {k: v for k, v in extra.items() if k in ("data_shape", "cond_dim", "context_dim", "cond_channels")}
        folder = _unet_folder(Path(tempfile.mkdtemp(prefix="unfog-diffusers-")), **wiring)
        return super().build(path=str(folder), **extra)
