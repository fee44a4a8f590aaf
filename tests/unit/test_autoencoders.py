"""The first-party autoencoders: ``identity``, ``kl`` (its defaults, errors and weights folders),
``kl_to_diffusers`` and ``diffusers_vae`` on tiny random diffusers VAEs saved here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import unfog
from unfog.errors import CheckpointError, ConfigError
from unfog.protocols import Autoencoder, FixedLatentScale
from unfog.util import sha256_of
from unfog_autoencoders.identity import Identity
from unfog_autoencoders.kl import KLAutoencoder, default_channel_mult
from unfog_diffusers.vae import DiffusersVAE, kl_to_diffusers

TINY = dict(channels=8, norm_groups=4)  # widths 8, 16, 32 at the default factor 4


def _images(n: int = 2, shape: tuple[int, ...] = (3, 16, 16), seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _tiny_kl(seed: int = 0, **kwargs: object) -> KLAutoencoder:
    torch.manual_seed(seed)
    return KLAutoencoder((3, 16, 16), **{**TINY, **kwargs}).eval()


def _write_folder(ae: KLAutoencoder, folder: Path, **extra: object) -> Path:
    """A weights folder as ``unfog train-autoencoder`` writes it, made by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "autoencoder.safetensors"
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(file))
    record = {"config": {"_name_": "kl", **ae.settings()}, "sha256": sha256_of(file), **extra}
    (folder / "autoencoder.json").write_text(json.dumps(record))
    return folder


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


# ----------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("shape", [(2,), (1, 64), (3, 8, 8)])
def test_identity_is_pixel_space_for_any_rank(shape: tuple[int, ...]) -> None:
    ae = Identity(shape)
    x = torch.randn(4, *shape)
    post = ae.encode(x)
    assert post.mean is x and (post.std == 0).all() and ae.decode(post.mean) is x
    assert ae.latent_shape(shape) == shape and ae.settings() == {}
    assert ae.lossless and ae.flip_equivariant and isinstance(ae, Autoencoder)
    assert isinstance(unfog.create("autoencoder", "identity"), Identity)  # data_shape is optional


# ------------------------------------------------------------------------------- kl: defaults


def test_kl_defaults_suit_64px_images() -> None:
    ae = KLAutoencoder((3, 64, 64))
    assert ae.settings() == {"factor": 4, "latent_channels": 4, "channels": 16, "channel_mult": [1, 2, 4],
                             "layers_per_block": 1, "attention": True, "norm_groups": 8}
    assert ae.latent_shape((3, 64, 64)) == (4, 16, 16)
    assert not ae.lossless and not ae.flip_equivariant and isinstance(ae, Autoencoder)
    with torch.no_grad():
        post = ae.encode(_images(1, (3, 64, 64)))
        assert post.mean.shape == (1, 4, 16, 16) and (post.std > 0).all()
        assert ae.decode(post.mean).shape == (1, 3, 64, 64)


@pytest.mark.parametrize(("factor", "mult"), [(1, [1]), (2, [1, 2]), (4, [1, 2, 4]), (8, [1, 2, 4, 4]),
                                              (16, [1, 2, 4, 4, 4])])
def test_kl_channel_mult_follows_the_factor(factor: int, mult: list[int]) -> None:
    assert default_channel_mult(factor) == mult
    ae = KLAutoencoder((1, 16, 16), factor=factor, **TINY)
    assert ae.settings()["channel_mult"] == mult
    assert ae.latent_shape((1, 16, 16)) == (4, 16 // factor, 16 // factor)
    with torch.no_grad():
        assert ae.encode(_images(1, (1, 16, 16))).mean.shape == (1, 4, 16 // factor, 16 // factor)


def test_kl_settings_rebuild_the_same_network() -> None:
    ae = _tiny_kl(factor=2, latent_channels=3, layers_per_block=2, attention=False)
    again = KLAutoencoder((3, 16, 16), **ae.settings())
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in ae.state_dict().items()}
    assert not any(".attn." in k for k in ae.state_dict())


def test_kl_log_variance_is_clamped() -> None:
    ae = _tiny_kl()
    with torch.no_grad():
        ae.quant_conv.bias[4:] = 1000.0  # the log-variance half of the moments
        std = ae.encode(_images()).std
    torch.testing.assert_close(std, torch.full_like(std, float(torch.tensor(10.0).exp())))


# --------------------------------------------------------------------------------- kl: errors


@pytest.mark.parametrize("factor", [0, 3, 6, -2])
def test_kl_factor_must_be_a_power_of_two(factor: int) -> None:
    with pytest.raises(ConfigError, match="factor must be a power of two"):
        KLAutoencoder((3, 16, 16), factor=factor)


def test_kl_channel_mult_needs_one_entry_per_level() -> None:
    with pytest.raises(ConfigError, match=r"log2\(factor\) \+ 1 = 3 entries for factor=4.*got \[1,2\]"):
        KLAutoencoder((3, 16, 16), channel_mult=[1, 2])


def test_kl_norm_groups_must_divide_every_width() -> None:
    with pytest.raises(ConfigError, match="norm_groups=32 must divide"):
        KLAutoencoder((3, 16, 16), channels=8, norm_groups=32)


def test_kl_needs_sizes_divisible_by_the_factor() -> None:
    with pytest.raises(ConfigError, match="30×30.*multiples of factor=4.*28×28 or 32×32"):
        KLAutoencoder((3, 30, 30))


@pytest.mark.parametrize("shape", [(2,), (1, 256)])
def test_kl_refuses_data_that_are_not_images(shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match=r"\(C, H, W\).*autoencoder=identity"):
        KLAutoencoder(shape)


def test_kl_missing_weights_say_how_to_make_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist.*unfog train-autoencoder dataset=... autoencoder=kl"):
        KLAutoencoder((3, 16, 16), weights=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="has no autoencoder.safetensors"):
        KLAutoencoder((3, 16, 16), weights=str(tmp_path))
    (tmp_path / "model.ckpt").write_bytes(b"\x80")
    with pytest.raises(ConfigError, match="folder written by `unfog train-autoencoder` or a .safetensors file"):
        KLAutoencoder((3, 16, 16), weights=str(tmp_path / "model.ckpt"))


# -------------------------------------------------------------------------- kl: weights folder


def test_kl_weights_folder_round_trip(tmp_path: Path) -> None:
    ae = _tiny_kl(seed=1, factor=2, latent_channels=3, layers_per_block=2)
    folder = _write_folder(ae, tmp_path / "ae")
    loaded = unfog.create("autoencoder", "kl", data_shape=(3, 16, 16), weights=str(folder)).eval()
    assert loaded.settings() == ae.settings()  # the architecture comes from the folder
    _same_state(loaded, ae)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x).mean, ae.encode(x).mean, rtol=0, atol=0)
    # The safetensors file itself: its architecture is read from the autoencoder.json beside it.
    _same_state(KLAutoencoder((3, 16, 16), weights=str(folder / "autoencoder.safetensors")), ae)
    # Explicit arguments that agree with the record are fine.
    KLAutoencoder((3, 16, 16), weights=str(folder), factor=2, channel_mult=[1, 2], attention=True)


def test_kl_safetensors_file_without_record_takes_the_arguments(tmp_path: Path) -> None:
    ae = _tiny_kl(seed=2, latent_channels=2)
    save_file(ae.state_dict(), str(tmp_path / "mine.safetensors"))
    _same_state(KLAutoencoder((3, 16, 16), latent_channels=2, weights=str(tmp_path / "mine.safetensors"), **TINY), ae)
    with pytest.raises(CheckpointError, match="do not fit a kl autoencoder.*of another shape.*pass the architecture"):
        KLAutoencoder((3, 16, 16), weights=str(tmp_path / "mine.safetensors"), **TINY)


def test_kl_reads_the_full_record_of_the_trainer(tmp_path: Path) -> None:
    ae = _tiny_kl(seed=3, factor=8, attention=False)
    _write_folder(ae, tmp_path / "ae", data_shape=[3, 16, 16], latent_shape=[4, 2, 2],
                  weights="autoencoder.safetensors", steps=10, metrics={"psnr": 20.0})
    _same_state(KLAutoencoder((3, 16, 16), weights=str(tmp_path / "ae")), ae)
    assert ae.last_layer() is ae.decoder.conv_out.weight


def test_kl_explicit_argument_that_contradicts_the_weights(tmp_path: Path) -> None:
    folder = _write_folder(_tiny_kl(factor=2), tmp_path / "ae")
    with pytest.raises(ConfigError, match=r"autoencoder.factor=4, but the weights in .*ae are of a kl autoencoder "
                                          r"with factor=2; drop autoencoder.factor"):
        KLAutoencoder((3, 16, 16), factor=4, weights=str(folder))
    with pytest.raises(ConfigError, match=r"autoencoder.channel_mult=\[1,4\].*channel_mult=\[1,2\]"):
        KLAutoencoder((3, 16, 16), channel_mult=[1, 4], weights=str(folder))


def test_kl_weights_of_another_autoencoder_or_channel_count(tmp_path: Path) -> None:
    folder = _write_folder(_tiny_kl(), tmp_path / "ae", data_shape=[3, 16, 16])
    with pytest.raises(ConfigError, match="encode 3-channel images.*the data have 1 channels"):
        KLAutoencoder((1, 16, 16), weights=str(folder))
    record = json.loads((folder / "autoencoder.json").read_text())
    record["config"]["_name_"] = "vq"
    (folder / "autoencoder.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="are of a 'vq' autoencoder.*autoencoder=vq"):
        KLAutoencoder((3, 16, 16), weights=str(folder))


def test_kl_sha_mismatch(tmp_path: Path) -> None:
    folder = _write_folder(_tiny_kl(), tmp_path / "ae")
    other = _tiny_kl(seed=5)  # same architecture, other weights
    save_file(other.state_dict(), str(folder / "autoencoder.safetensors"))
    with pytest.raises(CheckpointError, match="has sha256 .* but autoencoder.json records .*changed or damaged"):
        KLAutoencoder((3, 16, 16), weights=str(folder))


def test_kl_damaged_files(tmp_path: Path) -> None:
    folder = _write_folder(_tiny_kl(), tmp_path / "ae")
    file = folder / "autoencoder.safetensors"
    file.write_bytes(file.read_bytes()[:200])  # cut short, with a record that matches it
    record = json.loads((folder / "autoencoder.json").read_text())
    (folder / "autoencoder.json").write_text(json.dumps({**record, "sha256": sha256_of(file)}))
    with pytest.raises(CheckpointError, match="cannot read .*autoencoder.safetensors as safetensors") as info:
        KLAutoencoder((3, 16, 16), weights=str(folder))
    assert "\n" not in str(info.value)
    (folder / "autoencoder.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read .*autoencoder.json"):
        KLAutoencoder((3, 16, 16), weights=str(folder))


# ------------------------------------------------------------------------------ kl → diffusers


@pytest.mark.parametrize("kwargs", [dict(), dict(attention=False, layers_per_block=2, factor=2),
                                    dict(factor=1, latent_channels=3)])
def test_kl_to_diffusers_computes_the_same(kwargs: dict) -> None:
    ae = _tiny_kl(seed=4, **kwargs)
    for p in ae.parameters():  # larger than the default initialisation, so differences would show
        torch.nn.init.normal_(p, std=0.3 if p.ndim > 1 else 0.1)
    vae = kl_to_diffusers(ae)
    assert vae.config.mid_block_add_attention == ae.settings()["attention"]
    x = _images()
    with torch.no_grad():
        ours, theirs = ae.encode(x), vae.encode(x).latent_dist
        torch.testing.assert_close(theirs.mean, ours.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.std, ours.std, rtol=1e-5, atol=1e-5)
        z = torch.randn(ours.mean.shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(vae.decode(z).sample, ae.decode(z), rtol=1e-5, atol=1e-5)


def test_kl_exported_to_diffusers_loads_as_diffusers_vae(tmp_path: Path) -> None:
    ae = _tiny_kl(seed=6)
    kl_to_diffusers(ae).save_pretrained(tmp_path / "vae")
    wrapped = DiffusersVAE((3, 16, 16), path=str(tmp_path / "vae")).eval()
    assert wrapped.latent_shape((3, 16, 16)) == ae.latent_shape((3, 16, 16)) and wrapped.scale_factor == 1.0
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(wrapped.encode(x).mean, ae.encode(x).mean, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- diffusers_vae


def _tiny_vae_kl(folder: Path) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        sample_size=16, shift_factor=0.1)
    vae.save_pretrained(folder)
    return vae.eval()


def _tiny_vae_tiny(folder: Path) -> torch.nn.Module:
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                          num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    vae.save_pretrained(folder)
    return vae.eval()


def _rebuilt(ae: DiffusersVAE) -> DiffusersVAE:
    """What a checkpoint does: build from settings() (as JSON), then load the state dict."""
    again = unfog.create("autoencoder", "diffusers_vae", data_shape=ae.data_shape,
                         **json.loads(json.dumps(ae.settings())))
    again.load_state_dict(ae.state_dict())
    return again.eval()


def test_diffusers_vae_autoencoder_kl_round_trip(tmp_path: Path) -> None:
    vae = _tiny_vae_kl(tmp_path / "vae")
    ae = unfog.create("autoencoder", "diffusers_vae", data_shape=(3, 16, 16), path=str(tmp_path / "vae")).eval()
    assert isinstance(ae, Autoencoder) and isinstance(ae, FixedLatentScale)
    assert (ae.scale_factor, ae.shift_factor) == (pytest.approx(0.18215), pytest.approx(0.1))
    assert ae.latent_shape((3, 32, 48)) == (4, 16, 24) and not ae.lossless and not ae.flip_equivariant
    assert ae.settings()["class_name"] == "AutoencoderKL"
    assert not any(k.startswith("_") for k in ae.settings()["config"])
    x = _images()
    with torch.no_grad():
        post, dist = ae.encode(x), vae.encode(x).latent_dist
        torch.testing.assert_close(post.mean, dist.mean)
        torch.testing.assert_close(post.std, dist.std)
        torch.testing.assert_close(ae.decode(post.mean), vae.decode(dist.mean).sample)
        torch.testing.assert_close(_rebuilt(ae).encode(x).mean, post.mean, rtol=0, atol=0)


def test_diffusers_vae_autoencoder_tiny_is_deterministic(tmp_path: Path) -> None:
    vae = _tiny_vae_tiny(tmp_path / "taesd")
    ae = DiffusersVAE((3, 16, 16), path=str(tmp_path / "taesd")).eval()
    assert ae.latent_shape((3, 16, 16)) == (4, 8, 8) and ae.settings()["class_name"] == "AutoencoderTiny"
    assert (ae.scale_factor, ae.shift_factor) == (1.0, 0.0)
    x = _images()
    with torch.no_grad():
        post = ae.encode(x)
        assert post.mean.shape == (2, 4, 8, 8) and (post.std == 0).all()
        torch.testing.assert_close(post.mean, vae.encode(x).latents)
        assert ae.decode(post.mean).shape == (2, 3, 16, 16)
        torch.testing.assert_close(_rebuilt(ae).decode(post.mean), ae.decode(post.mean), rtol=0, atol=0)


def test_diffusers_vae_finds_the_vae_of_a_pipeline_folder(tmp_path: Path) -> None:
    _tiny_vae_kl(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    found = DiffusersVAE((3, 16, 16), path=str(tmp_path / "pipe"))
    named = DiffusersVAE((3, 16, 16), path=str(tmp_path / "pipe"), subfolder="vae")
    _same_state(found, named)
    (tmp_path / "pipe" / "vae").rename(tmp_path / "pipe" / "first_stage")
    _same_state(DiffusersVAE((3, 16, 16), path=str(tmp_path / "pipe"), subfolder="first_stage"), found)
    with pytest.raises(ConfigError, match=r"found no .*pipe/config.json or .*pipe/vae/config.json"):
        DiffusersVAE((3, 16, 16), path=str(tmp_path / "pipe"))


def test_diffusers_vae_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"needs autoencoder.path=DIR \(a folder with config.json, e.g. Stable "):
        DiffusersVAE((3, 16, 16))
    with pytest.raises(ConfigError, match="is not a folder"):
        DiffusersVAE((3, 16, 16), path=str(tmp_path / "nowhere"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ConfigError, match="'UNet2DModel'.*reads only AutoencoderKL and AutoencoderTiny"):
        DiffusersVAE((3, 16, 16), path=str(tmp_path / "unet"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match="cannot load the AutoencoderKL in .*empty"):
        DiffusersVAE((3, 16, 16), path=str(tmp_path / "empty"))
    _tiny_vae_kl(tmp_path / "vae")
    with pytest.raises(ConfigError, match="3-channel images, but the data have 1 channels"):
        DiffusersVAE((1, 16, 16), path=str(tmp_path / "vae"))
    with pytest.raises(ConfigError, match="downsamples by 2.*resize the data to 14×14 or 16×16"):
        DiffusersVAE((3, 15, 15), path=str(tmp_path / "vae"))
    with pytest.raises(ConfigError, match="not both"):
        DiffusersVAE((3, 16, 16), path=str(tmp_path / "vae"), config={}, class_name="AutoencoderKL")
    with pytest.raises(ConfigError, match="reads only"):
        DiffusersVAE((3, 16, 16), config={}, class_name="VQModel")


def test_vae_plugin_imports_without_diffusers() -> None:
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import unfog_diffusers.vae as v\n"
            "from unfog.errors import ConfigError\n"
            "try:\n    v.DiffusersVAE((3, 16, 16), path='.')\nexcept ConfigError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'unfog[diffusers]'" in out.stdout
