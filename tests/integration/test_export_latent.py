"""``unfog export format=diffusers`` of latent models: an LDMPipeline (unconditional
diffusers_unet) or a DiTPipeline (diffusers_transformer with a class label) whose VAE decodes
unfog's normalised latents, reproducing unfog's decoded samples for the same noise.

The pipelines are built directly with random weights (the comparisons are of arithmetic, not
of quality): a tiny ``kl`` autoencoder with a per-channel normalisation, which the exporter
folds into the VAE's post_quant_conv, and a tiny diffusers ``AutoencoderKL`` with Stable
Diffusion's fixed scale, which it keeps as it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")

import unfog  # noqa: E402
from unfog.building import build_model  # noqa: E402
from unfog.config import build  # noqa: E402
from unfog.diffusion import SeededNoise  # noqa: E402
from unfog.errors import ConfigError  # noqa: E402
from unfog.latents import LatentSpace  # noqa: E402
from unfog.pipeline import DiffusionPipeline  # noqa: E402
from unfog.schemas import SamplingSettings  # noqa: E402

DATA = (3, 16, 16)
LATENT = (4, 8, 8)
KL = {"_name_": "kl", "factor": 2, "channels": 8, "norm_groups": 4}
SHIFT = torch.tensor([0.3, -0.2, 0.1, 0.5])
SCALE = torch.tensor([0.6, 1.7, 0.9, 1.3])
SD_SCALE = 0.18215  # Stable Diffusion 1.x's scaling_factor
UNET = {"_name_": "diffusers_unet", "block_out_channels": [16, 32]}
DIT = {"_name_": "diffusers_transformer", "patch_size": 2, "num_layers": 2, "num_attention_heads": 2,
       "attention_head_dim": 8}
LABELS = {"class_label": {"_name_": "class_label", "dim": 16}}
TEXT = {"caption": {"_name_": "text", "dim": 16, "layers": 1, "heads": 2, "max_length": 8, "vocab_size": 64}}
LINEAR = {"_name_": "linear"}
# max |unfog − diffusers| over the decoded images, measured 5e-7 to 1.1e-6 (float32; the folded
# post_quant_conv and diffusers' float32 cumprod of ᾱ round differently from unfog)
TOLERANCE = 2e-5


def _kl_space(shift: torch.Tensor = SHIFT, scale: torch.Tensor = SCALE, data: tuple[int, ...] = DATA) -> LatentSpace:
    """A tiny random kl autoencoder with a per-channel normalisation."""
    torch.manual_seed(1)
    ae = unfog.create("autoencoder", "kl", data_shape=data, **{k: v for k, v in KL.items() if k != "_name_"})
    return LatentSpace(ae, "kl", data, shift, scale, source=KL)


def _vae_folder(root: Path, tiny: bool = False, **config: Any) -> Path:
    """A tiny random diffusers VAE saved with save_pretrained: an AutoencoderKL with Stable
    Diffusion's scaling_factor, or an AutoencoderTiny."""
    import diffusers

    torch.manual_seed(2)
    if tiny:
        vae = diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                        num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4,
                                        upsampling_scaling_factor=2)
    else:
        vae = diffusers.AutoencoderKL(
            latent_channels=4, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16, scaling_factor=SD_SCALE,
            **config,
        )
    vae.save_pretrained(root, safe_serialization=True)
    return root


def _vae_space(folder: Path, scale: torch.Tensor | None = None) -> LatentSpace:
    """diffusers_vae on ``folder``, normalised by its scaling_factor (``latents.normalize=fixed``) or ``scale``."""
    ae = unfog.create("autoencoder", "diffusers_vae", data_shape=DATA, path=str(folder))
    scale = torch.full((4,), ae.scale_factor) if scale is None else scale
    return LatentSpace(ae, "diffusers_vae", DATA, torch.zeros(4), scale, source={"_name_": "diffusers_vae",
                                                                                  "path": str(folder)})


def _pipeline(latent: LatentSpace, backbone: dict[str, Any] = UNET, conditioners: dict[str, Any] | None = None,
              schedule: dict[str, Any] = LINEAR, data_range: tuple[float, float] = (-1, 1),
              guidance: float = 1.0) -> DiffusionPipeline:
    """A latent pipeline with random weights, as ``Pipeline.load`` builds one from a checkpoint."""
    cfg = {"backbone": backbone, "conditioners": conditioners or {}, "schedule": schedule, "prediction": "eps",
           "sampler": {"_name_": "ddim", "steps": 4}, "sampling": {"guidance": guidance}}
    torch.manual_seed(0)
    model = build_model(cfg, latent.latent_shape, 10 if conditioners else None).eval()
    return DiffusionPipeline(model, build("schedule", schedule), "eps", data_shape=latent.data_shape,
                             data_range=data_range, config=cfg, versions={"unfog": "0.1.0"}, latent=latent.eval())


def _export(pipeline: DiffusionPipeline, out: Path, sampler: str = "ddim", **settings: Any) -> Path:
    exporter = unfog.create("exporter", "diffusers")
    return exporter.export(pipeline, out, unfog.create("sampler", sampler, **settings))


def _record(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "unfog.json").read_text())


def _load(folder: Path) -> Any:
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unfog_from(pipeline: DiffusionPipeline, sampler: Any, noise: torch.Tensor, rng: SeededNoise,
                values: dict[str, Any] | None = None, guidance: float = 1.0) -> torch.Tensor:
    """unfog's decoded samples drawn from ``noise`` (not σ(1)·noise), as diffusers' pipelines start."""
    with torch.no_grad():
        denoiser = pipeline.model.denoiser(pipeline.schedule, pipeline.prediction, values, len(noise), guidance)
        return pipeline.latent.decode(sampler.sample(denoiser, noise, rng)).clamp(-1, 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one thread is ~100x faster than two contending."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def kl_unet() -> DiffusionPipeline:
    """An unconditional latent diffusers_unet on the linear schedule, kl autoencoder, per-channel normalisation."""
    return _pipeline(_kl_space())


# (a) LDMPipeline ---------------------------------------------------------------------------------------------

def test_ldm_pipeline_reproduces_unfog_samples(kl_unet: DiffusionPipeline, tmp_path: Path) -> None:
    steps, n, seed = 10, 4, 3
    folder = _export(kl_unet, tmp_path / "pipe", steps=steps)
    assert (folder / "vqvae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(folder.rglob("*.bin")), "weights must be safetensors only"
    pipe = _load(folder)
    assert type(pipe).__name__ == "LDMPipeline" and type(pipe.vqvae).__name__ == "AutoencoderKL"
    sched = pipe.scheduler.config
    assert sched.trained_betas == kl_unet.schedule.betas.tolist() and sched.clip_sample is False
    assert pipe.vqvae.config.scaling_factor == 1.0
    call = _record(folder)["pipeline_call"]
    assert call == {"num_inference_steps": steps, "eta": 0.0}

    # the folded VAE decodes normalised latents as unfog's latent space does
    z = 2 * torch.randn(3, *LATENT)
    with torch.no_grad():
        fold_diff = (pipe.vqvae.decode(z).sample - kl_unet.latent.decode(z)).abs().max().item()
    assert fold_diff < 1e-5, fold_diff  # measured 1.3e-6 (float32 rounding of the folded conv)

    # 1. unet + scheduler driven by hand from unfog's initial noise σ(1)·ε, decoded by the folder's VAE
    sampler = unfog.create("sampler", "ddim", steps=steps)
    ours = kl_unet.generate(sampler, n, settings=SamplingSettings(seed=seed))
    assert ours.shape == (n, *DATA)
    rng = SeededNoise.for_indices(seed, range(n))
    sigma_1 = float(kl_unet.schedule.sigma(torch.tensor([1.0], dtype=torch.float64))[0])
    x = sigma_1 * rng.randn_like(torch.empty(n, *LATENT))
    pipe.scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(pipe.unet(x, t).sample, t, x, eta=0.0).prev_sample
        theirs = pipe.vqvae.decode(x / pipe.vqvae.config.scaling_factor).sample.clamp(-1, 1)
    loop_diff = (theirs - ours).abs().max().item()
    assert loop_diff < TOLERANCE, loop_diff
    assert 0.5 < (ours.abs() < 0.999).float().mean()  # not a comparison of clamped constants

    # 2. the pipeline's own __call__, seeded per sample as unfog seeds its streams, from plain ε
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + k) for k in range(n)]
    images = torch.from_numpy(pipe(batch_size=n, generator=gens, output_type="np", **call).images)
    rng = SeededNoise.for_indices(seed, range(n))
    same = _unfog_from(kl_unet, sampler, rng.randn_like(torch.empty(n, *LATENT)), rng)
    pipe_diff = (images.permute(0, 3, 1, 2) * 2 - 1 - same).abs().max().item()  # the pipeline returns x/2 + 1/2
    assert pipe_diff < TOLERANCE, pipe_diff


def test_the_record_and_readme_describe_the_autoencoder(kl_unet: DiffusionPipeline, tmp_path: Path) -> None:
    from unfog.util import sha256_of

    folder = _export(kl_unet, tmp_path / "pipe", steps=5)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "LDMPipeline" and index["vqvae"] == ["diffusers", "AutoencoderKL"]
    ae = _record(folder)["autoencoder"]
    latent = kl_unet.latent
    assert ae["name"] == "kl" and ae["sha256"] == latent.sha256 and ae["config"] == latent.config()
    assert ae["shift"] == SHIFT.tolist() and ae["scale"] == SCALE.tolist() and ae["latent_shape"] == list(LATENT)
    assert ae["folded"] == "post_quant_conv" and ae["scaling_factor"] == 1.0 and ae["subfolder"] == "vqvae"
    assert ae["weights_sha256"] == sha256_of(folder / "vqvae" / "diffusion_pytorch_model.safetensors")
    assert _record(folder)["wiring"]["latent_shape"] == list(LATENT)
    readme = (folder / "README.md").read_text()
    assert "pipe(batch_size=4, num_inference_steps=5, eta=0.0)" in readme
    assert f"`kl` (weights sha256 {latent.sha256[:16]}" in readme
    assert "folded into the VAE's 1×1 post_quant_conv" in readme
    assert "normalise them, (z − shift) · scale" in readme and "VQModel, got AutoencoderKL" in readme


def test_the_exporter_leaves_the_pipeline_as_it_was(tmp_path: Path) -> None:
    folder = _vae_folder(tmp_path / "vae")
    pipeline = _pipeline(_vae_space(folder, scale=SCALE))
    before = {k: v.clone() for k, v in pipeline.latent.state_dict().items()}
    _export(pipeline, tmp_path / "pipe", steps=3)
    after = pipeline.latent.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_unfog_export_loads_a_saved_latent_model_with_its_autoencoder(tmp_path: Path) -> None:
    from unfog.export import export

    pipeline = _pipeline(_kl_space(), DIT, LABELS, guidance=2.0)
    saved = pipeline.save(tmp_path / "model")  # an unfog export folder, read back by Pipeline.load
    folder = export({"checkpoint": str(saved), "format": {"_name_": "diffusers"},
                     "sampler": {"_name_": "ddim", "steps": 5}, "output_dir": str(tmp_path / "pipe")})
    record = _record(folder)
    assert record["source_checkpoint"] == str(saved.resolve()) and record["autoencoder"]["sha256"] == \
        pipeline.latent.sha256
    assert record["pipeline_call"] == {"num_inference_steps": 5, "guidance_scale": 2.0}
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DiTPipeline"


# (b) diffusers_vae --------------------------------------------------------------------------------------------

def test_a_fixed_scale_vae_is_kept_as_it_is(tmp_path: Path) -> None:
    import diffusers

    folder = _vae_folder(tmp_path / "vae")
    pipeline = _pipeline(_vae_space(folder))
    steps, n, seed = 10, 3, 5
    out = _export(pipeline, tmp_path / "pipe", steps=steps)
    ae = _record(out)["autoencoder"]
    assert ae["name"] == "diffusers_vae" and ae["folded"] == "scaling_factor" and ae["scaling_factor"] == SD_SCALE
    pipe = _load(out)
    assert pipe.vqvae.config.scaling_factor == SD_SCALE
    saved = diffusers.AutoencoderKL.from_pretrained(folder).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in pipe.vqvae.state_dict().items())

    gens = [torch.Generator().manual_seed(seed * 1_000_003 + k) for k in range(n)]
    images = torch.from_numpy(pipe(batch_size=n, generator=gens, output_type="np", num_inference_steps=steps).images)
    rng = SeededNoise.for_indices(seed, range(n))
    sampler = unfog.create("sampler", "ddim", steps=steps)
    same = _unfog_from(pipeline, sampler, rng.randn_like(torch.empty(n, *LATENT)), rng)
    diff = (images.permute(0, 3, 1, 2) * 2 - 1 - same).abs().max().item()
    assert diff < TOLERANCE, diff
    assert 0.5 < (same.abs() < 0.999).float().mean()


def test_a_vae_without_post_quant_conv_gets_one_to_fold_into(tmp_path: Path) -> None:
    folder = _vae_folder(tmp_path / "vae", use_post_quant_conv=False)
    pipeline = _pipeline(_vae_space(folder, scale=SCALE))
    assert pipeline.latent.autoencoder.vae.post_quant_conv is None
    out = _export(pipeline, tmp_path / "pipe", steps=3)
    pipe = _load(out)
    assert pipe.vqvae.config.use_post_quant_conv is True and pipe.vqvae.config.scaling_factor == 1.0
    z = torch.randn(2, *LATENT)
    with torch.no_grad():
        diff = (pipe.vqvae.decode(z).sample - pipeline.latent.decode(z)).abs().max().item()
    assert diff < 1e-5, diff  # measured 1.0e-6


# (c) DiTPipeline ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_dit_pipeline_reproduces_unfog_class_conditional_samples(tmp_path: Path, guidance: float) -> None:
    steps, seed = 8, 4
    labels = [0, 3, 9, 3]
    n = len(labels)
    pipeline = _pipeline(_kl_space(), DIT, LABELS, {"_name_": "cosine"}, guidance=guidance)
    folder = _export(pipeline, tmp_path / "pipe", steps=steps)
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = _load(folder)
    assert type(pipe).__name__ == "DiTPipeline" and pipe.vae.config.scaling_factor == 1.0
    assert pipe.transformer.config.num_embeds_ada_norm == 1000 and pipe.get_label_ids(["9"]) == [9]
    call = _record(folder)["pipeline_call"]
    assert call == {"num_inference_steps": steps, "guidance_scale": guidance}
    assert "pipe(class_labels=[0, 1, 2, 3], num_inference_steps=8" in (folder / "README.md").read_text()

    gens = [torch.Generator().manual_seed(seed * 1_000_003 + k) for k in range(n)]
    images = pipe(class_labels=labels, generator=gens, output_type="pt", **call).images
    rng = SeededNoise.for_indices(seed, range(n))
    sampler = unfog.create("sampler", "ddim", steps=steps)
    same = _unfog_from(pipeline, sampler, rng.randn_like(torch.empty(n, *LATENT)), rng,
                       {"label": torch.tensor(labels)}, guidance)
    diff = (images * 2 - 1 - same).abs().max().item()
    assert diff < TOLERANCE, diff
    assert 0.5 < (same.abs() < 0.999).float().mean()


def test_an_unconditional_dit_exports_with_one_embedding_for_every_class(tmp_path: Path) -> None:
    steps, n, seed = 6, 2, 1
    pipeline = _pipeline(_kl_space(), DIT)
    folder = _export(pipeline, tmp_path / "pipe", steps=steps)
    pipe = _load(folder)
    assert _record(folder)["pipeline_call"]["guidance_scale"] == 1.0
    assert "every class id gives the same embedding" in (folder / "README.md").read_text()
    rng = SeededNoise.for_indices(seed, range(n))
    same = _unfog_from(pipeline, unfog.create("sampler", "ddim", steps=steps),
                       rng.randn_like(torch.empty(n, *LATENT)), rng)
    for labels in ([0, 0], [7, 512]):
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + k) for k in range(n)]
        images = pipe(class_labels=labels, generator=gens, output_type="pt", num_inference_steps=steps,
                      guidance_scale=1.0).images
        diff = (images * 2 - 1 - same).abs().max().item()
        assert diff < TOLERANCE, (labels, diff)


# (d) what is refused ------------------------------------------------------------------------------------------

class Mine(torch.nn.Module):
    """An autoencoder with no diffusers counterpart: 2×2 average pooling, channels kept."""

    def latent_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (data_shape[0], data_shape[1] // 2, data_shape[2] // 2)


def test_latent_export_errors_say_what_to_do(kl_unet: DiffusionPipeline, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"conditioner caption \(text\): format=diffusers writes a latent model as "
                                          r"LDMPipeline .*DiTPipeline .*format=safetensors"):
        _export(_pipeline(_kl_space(), UNET, TEXT), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"LDMPipeline is unconditional.*\['class_label'\].*"
                                          r"backbone=diffusers_transformer \(DiTPipeline\)"):
        _export(_pipeline(_kl_space(), UNET, LABELS), tmp_path / "b")
    unet = {"_name_": "unet", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [],
            "dropout": 0.0, "groups": 4}
    with pytest.raises(ConfigError, match=r"backbone 'unet' \(not a diffusers model\).*format=safetensors"):
        _export(_pipeline(_kl_space(), unet), tmp_path / "c")
    tiny = _pipeline(_vae_space(_vae_folder(tmp_path / "tiny", tiny=True), scale=SCALE))
    with pytest.raises(ConfigError, match=r"AutoencoderTiny .* cannot be folded .*latents.normalize=fixed"):
        _export(tiny, tmp_path / "d")
    with pytest.raises(ConfigError, match=r"data in \[-1, 1\], but this model's data range is \[0.0, 1.0\]"):
        _export(_pipeline(_kl_space(), data_range=(0, 1)), tmp_path / "e")
    with pytest.raises(ConfigError, match=r"DiTPipeline passes no eta.*sampler.eta=0"):
        _export(_pipeline(_kl_space(), DIT, LABELS), tmp_path / "f", eta=0.5)
    with pytest.raises(ConfigError, match=r"LDMPipeline draws square latents.*8×4"):
        _export(_pipeline(_kl_space(data=(3, 16, 8))), tmp_path / "g")
    mine = LatentSpace(Mine(), "mine", DATA)
    with pytest.raises(ConfigError, match=r"autoencoder 'mine' has no diffusers counterpart \(kl and diffusers_vae"):
        _export(_pipeline(mine), tmp_path / "h")
    with pytest.raises(ConfigError, match="needs a discrete schedule"):
        _export(_pipeline(_kl_space(), schedule={"_name_": "rectified_flow"}), tmp_path / "i")
    assert not [p.name for p in tmp_path.iterdir() if p.name not in ("tiny",)]  # nothing written before the checks
    assert _export(_pipeline(_kl_space(), data_range=None), tmp_path / "j", steps=2).is_dir()  # unknown range: ok
