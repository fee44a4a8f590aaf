"""Interop with diffusers: its models as backbones, and ``unfog export`` as safetensors or as a
diffusers pipeline that reproduces unfog's samples for the same noise."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

pytest.importorskip("diffusers")

import unfog  # noqa: E402
import unfog_backbones  # noqa: E402
import unfog_backbones.diffusers_models as dm  # noqa: E402  (registers the diffusers backbones)
from unfog.cli import conf_dir  # noqa: E402
from unfog.config import register_configs  # noqa: E402
from unfog.diffusion import SeededNoise  # noqa: E402
from unfog.errors import ConfigError, DataError  # noqa: E402
from unfog.export import export_diffusers, export_safetensors, load_exported  # noqa: E402
from unfog.run import load_checkpoint, train  # noqa: E402
from unfog.sampling import generate  # noqa: E402
from unfog.testing import BackboneContract  # noqa: E402

TINY = ["trainer=debug", "logger=csv", "data.batch_size=16", "sampling.num_samples=0", "optim.warmup_steps=0"]
DIFFUSERS_TINY = ["backbone=diffusers_unet", "backbone.block_out_channels=[16,32]", "~conditioner",
                  "sampling.guidance=1"]
# the package __init__ imports the module once it is wired in; until then the CLI cannot see it
IN_PACKAGE = "diffusers_models" in Path(unfog_backbones.__file__).read_text()


def _cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=[*TINY, *overrides])


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one thread is ~100x faster than two contending."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def diffusers_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unconditional diffusers_unet trained 4 steps on the 8x8 digits (cosine schedule, T = 1000)."""
    return train(_cfg(*DIFFUSERS_TINY), tmp_path_factory.mktemp("diffusers_run")).checkpoint


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """unfog's own class-conditional unet_tiny, trained 2 steps."""
    return train(_cfg("backbone=unet_tiny", "trainer.max_steps=2"), tmp_path_factory.mktemp("unet_run")).checkpoint


def _unet_folder(root: Path, data_shape: tuple[int, ...] = (1, 8, 8), cond_dim: int = 0, context_dim: int = 0,
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

@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_diffusers_pipeline_reproduces_unfog_samples(diffusers_run: Path, tmp_path: Path, sampler: str) -> None:
    import diffusers

    steps, n, seed = 10, 6, 3
    folder = export_diffusers(diffusers_run, tmp_path / "pipe", {"_name_": sampler, "steps": steps})
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(folder.rglob("*.bin")), "weights must be safetensors only"
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    model, schedule, meta = load_checkpoint(diffusers_run)
    assert type(pipe).__name__ == {"ddim": "DDIMPipeline", "ddpm": "DDPMPipeline"}[sampler]
    sched = pipe.scheduler.config
    assert sched.trained_betas == schedule.betas.tolist()  # unfog's betas, exactly
    assert (sched.prediction_type, sched.clip_sample, sched.clip_sample_range) == ("epsilon", True, 1.0)
    unfog_sampler = unfog.create("sampler", sampler, steps=steps)
    call = json.loads((folder / "unfog.json").read_text())["pipeline_call"]
    assert call["num_inference_steps"] == steps

    # 1. unet + scheduler driven by hand from unfog's own initial noise (σ(1)·ε) and step noise
    ours = generate(model, schedule, unfog_sampler, "eps", (1, 8, 8), range(n), seed=seed, clip=(-1.0, 1.0))
    rng = SeededNoise.for_indices(seed, range(n))
    sigma_1 = float(schedule.sigma(torch.tensor([1.0], dtype=torch.float64))[0])
    x = sigma_1 * rng.randn_like(torch.empty(n, 1, 8, 8))
    pipe.scheduler.set_timesteps(steps)
    extra = {k: v for k, v in call.items() if k != "num_inference_steps"}
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(pipe.unet(x, t).sample, t, x, generator=rng.generators, **extra).prev_sample
    loop_diff = (x - ours).abs().max().item()
    # measured: 6.6e-7 (DDIM) and 5.9e-6 (DDPM); both sides compute in float32, diffusers' ᾱ by a float32 cumprod
    assert loop_diff < 1e-4, loop_diff
    assert 0.05 < (ours.abs() < 0.999).float().mean()  # not a comparison of clipped constants

    # 2. the pipeline's own __call__, seeded per sample as unfog seeds its streams; diffusers starts
    #    from plain ε, so unfog's sampler is run from the same ε
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + k) for k in range(n)]
    images = pipe(batch_size=n, generator=gens, output_type="pt", **call).images
    rng = SeededNoise.for_indices(seed, range(n))
    noise = rng.randn_like(torch.empty(n, 1, 8, 8))
    with torch.no_grad():
        same = unfog_sampler.sample(model.denoiser(schedule, "eps", None, n, clip=(-1.0, 1.0)), noise, rng)
    pipe_diff = (images * 2 - 1 - same).abs().max().item()  # the pipeline returns x/2 + 1/2 in [0, 1]
    assert pipe_diff < 1e-4, pipe_diff  # measured: 7e-7 (DDIM) and 6e-6 (DDPM)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers' schedulers
def test_other_samplers_map_to_their_diffusers_schedulers(diffusers_run: Path, tmp_path: Path) -> None:
    import diffusers

    model, schedule, _ = load_checkpoint(diffusers_run)
    expected = {"dpm_solver_pp": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
                "euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler",
                "euler_ancestral": "EulerAncestralDiscreteScheduler"}
    for name, cls in expected.items():
        folder = export_diffusers(diffusers_run, tmp_path / name, {"_name_": name})
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "DDPMPipeline" and index["scheduler"] == ["diffusers", cls], name
        scheduler = getattr(diffusers, cls).from_pretrained(folder / "scheduler")
        assert scheduler.config.trained_betas == schedule.betas.tolist()
        assert json.loads((folder / "unfog.json").read_text())["exact"] is False


# (b) safetensors export of any backbone ------------------------------------------------------------------

def test_safetensors_export_samples_like_the_checkpoint(unet_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = export_safetensors(unet_run, tmp_path / "export")
    model, schedule, meta = load_checkpoint(unet_run)
    state = load_file(str(folder / "model.safetensors"))
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the EMA weights
    record = json.loads((folder / "unfog.json").read_text())
    assert record["config"] == meta["config"] and record["wiring"] == meta["wiring"]
    assert record["versions"]["unfog"] and record["source_checkpoint"] == str(unet_run.resolve())
    assert len(record["sha256"]) == 64
    loaded, schedule2, meta2 = load_exported(folder)
    assert torch.equal(schedule2.betas, schedule.betas)
    sampler = unfog.create("sampler", "ddim", steps=3)
    kwargs = dict(values={"label": torch.arange(5)}, guidance=2.0, clip=(-1.0, 1.0), seed=1)
    a = generate(model, schedule, sampler, "eps", (1, 8, 8), range(5), **kwargs)
    b = generate(loaded, schedule2, sampler, "eps", (1, 8, 8), range(5), **kwargs)
    assert torch.equal(a, b)
    again, _, _ = load_checkpoint(folder)  # a folder is read as an export
    assert all(torch.equal(p, q) for p, q in zip(again.state_dict().values(), loaded.state_dict().values()))


def test_a_changed_export_is_refused(unet_run: Path, tmp_path: Path) -> None:
    folder = export_safetensors(unet_run, tmp_path / "export", use_ema=False)
    assert json.loads((folder / "unfog.json").read_text())["ema"] is False
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(DataError, match="does not match the sha256"):
        load_exported(folder)
    with pytest.raises(ConfigError, match="is not an unfog export"):
        load_exported(tmp_path)


def test_cli_exports_and_samples_from_the_export(unet_run: Path, diffusers_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    from _cli import run

    from unfog.cli import main

    # `unfog export` in this process (the diffusers backbones are registered here), `unfog sample` for real
    hydra_dir = f"hydra.run.dir={tmp_path / 'hydra'}"
    main(["export", f"checkpoint={unet_run}", "format=safetensors", f"output_dir={tmp_path / 'export'}", hydra_dir])
    main(["export", f"checkpoint={diffusers_run}", "format=diffusers", "sampler=ddpm", "sampler.steps=5",
          f"output_dir={tmp_path / 'pipe'}", hydra_dir])
    printed = capsys.readouterr().out
    assert f"as safetensors to {tmp_path / 'export'}" in printed and f"as diffusers to {tmp_path / 'pipe'}" in printed
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    run("sample", f"checkpoint={tmp_path / 'export'}", "num_samples=4", "sampler.steps=2",
        f"output_dir={tmp_path / 'samples'}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    data = np.load(tmp_path / "samples" / "samples.npz")
    assert data["samples"].shape == (4, 1, 8, 8) and list(data["labels"]) == [0, 1, 2, 3]


@pytest.mark.skipif(not IN_PACKAGE, reason="unfog_backbones/__init__.py does not import diffusers_models yet")
def test_cli_trains_a_diffusers_backbone(tmp_path: Path) -> None:
    from _cli import run

    out = run("train", *TINY, *DIFFUSERS_TINY, "trainer.max_steps=1", f"hydra.run.dir={tmp_path}", cwd=tmp_path,
              env={"OMP_NUM_THREADS": "1"})
    assert "trained 1 steps" in out.stdout


# (c) a diffusers model folder as the backbone ---------------------------------------------------------------

def test_diffusers_folder_trains_from_the_saved_weights(tmp_path: Path) -> None:
    import diffusers

    folder = _unet_folder(tmp_path / "unet")
    net = unfog.create("backbone", "diffusers_folder", data_shape=(1, 8, 8), path=str(folder))
    saved = diffusers.UNet2DModel.from_pretrained(folder).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in net.diffusers_model.state_dict().items())
    result = train(_cfg("backbone=diffusers_folder", f"backbone.path={folder}", "~conditioner",
                        "sampling.guidance=1", "trainer.max_steps=2"), tmp_path / "run")
    assert result.steps == 2 and result.final_loss is not None and torch.isfinite(torch.tensor(result.final_loss))


def test_diffusers_folder_refuses_a_missing_or_mismatched_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        unfog.create("backbone", "diffusers_folder", data_shape=(1, 8, 8), path=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no config.json"):
        unfog.create("backbone", "diffusers_folder", data_shape=(1, 8, 8), path=str(tmp_path))
    folder = _unet_folder(tmp_path / "unet")
    with pytest.raises(ConfigError, match=r"1 input and 1 output channels at sample_size 8.*\(3, 16, 16\)"):
        unfog.create("backbone", "diffusers_folder", data_shape=(3, 16, 16), path=str(folder))
    with pytest.raises(ConfigError, match="vector conditioning of width 5 needs"):
        unfog.create("backbone", "diffusers_folder", data_shape=(1, 8, 8), path=str(folder), cond_dim=5)


# (d) clear errors -----------------------------------------------------------------------------------------

def test_export_errors_say_what_to_do(unet_run: Path, diffusers_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="backbone=diffusers_unet.*'unet'.*format=safetensors"):
        export_diffusers(unet_run, tmp_path / "a")
    ckpt = torch.load(diffusers_run, map_location="cpu", weights_only=True)
    ckpt["unfog"]["config"]["prediction"] = "flow"
    flow = tmp_path / "flow.ckpt"
    torch.save(ckpt, flow)
    with pytest.raises(ConfigError, match="predicts 'flow'.*format=safetensors"):
        export_diffusers(flow, tmp_path / "b")
    with pytest.raises(ConfigError, match="sampler 'x0_jump' has no diffusers scheduler; .*ddim, ddpm"):
        export_diffusers(diffusers_run, tmp_path / "c", {"_name_": "x0_jump"})
    with pytest.raises(ConfigError, match="spacing=karras has no counterpart"):
        export_diffusers(diffusers_run, tmp_path / "d", {"_name_": "ddim", "spacing": "karras"})
    from unfog.export import export

    with pytest.raises(ConfigError, match="Unknown export format 'onnx'"):
        export({"format": "onnx", "checkpoint": str(unet_run), "output_dir": str(tmp_path)})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_missing_diffusers_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'unfog\[diffusers\]'"):
        unfog.create("backbone", "diffusers_unet", data_shape=(1, 8, 8))


# (e) the wrappers, unit level -----------------------------------------------------------------------------

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
    routes = unfog.get("backbone", key).obj.routes
    combos = [{}] + [ROUTES[r] for r in routes] + [{k: v for r in routes for k, v in ROUTES[r].items()}]
    for n, wiring in enumerate(combos):
        extra = {"block_out_channels": (16, 32)} if key == "diffusers_unet" else {}
        if key == "diffusers_folder":
            extra = {"path": str(_unet_folder(tmp_path / str(n), **wiring))}
        net = unfog.create("backbone", key, data_shape=(1, 8, 8), **wiring, **extra)
        x = torch.randn(3, 1, 8, 8)
        out = net(x, torch.rand(3), _cond(wiring))
        assert out.shape == x.shape and torch.isfinite(out).all(), (key, wiring)
    unet = unfog.create("backbone", "diffusers_unet", data_shape=(1, 8, 8), block_out_channels=(16, 32), context_dim=12)
    assert unet.diffusers_class == "UNet2DConditionModel" and unet.diffusers_config["cross_attention_dim"] == 12


def test_folder_with_a_class_embedding_runs_without_conditioning(tmp_path: Path) -> None:
    folder = _unet_folder(tmp_path / "a", class_embed_type="identity")  # takes a vector, here none: zeros
    net = unfog.create("backbone", "diffusers_folder", data_shape=(1, 8, 8), path=str(folder))
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    plain = net.diffusers_model(x, dm.diffusers_timestep(t, 1000), class_labels=torch.zeros(2, 64)).sample
    assert torch.equal(net(x, t, {}), plain)
    with pytest.raises(ConfigError, match="embeds class ids itself"):
        unfog.create("backbone", "diffusers_folder", data_shape=(1, 8, 8),
                     path=str(_unet_folder(tmp_path / "b", num_class_embeds=10)))
    with pytest.raises(ConfigError, match="needs a token conditioner of that width"):
        unfog.create("backbone", "diffusers_folder", data_shape=(1, 8, 8),
                     path=str(_unet_folder(tmp_path / "c", context_dim=6)))


def test_wrappers_refuse_what_they_cannot_build() -> None:
    with pytest.raises(ConfigError, match="divisible by 4"):
        unfog.create("backbone", "diffusers_unet", data_shape=(1, 6, 6), block_out_channels=(8, 8, 8))
    with pytest.raises(ConfigError, match="norm_num_groups=8"):
        unfog.create("backbone", "diffusers_unet", data_shape=(1, 8, 8), block_out_channels=(12, 16))
    with pytest.raises(ConfigError, match="no cross-attention"):
        unfog.create("backbone", "diffusers_transformer", data_shape=(1, 8, 8), context_dim=4)
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
