"""The first-stage losses of ``unfog train-autoencoder`` against their formulas."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import unfog
from unfog.errors import ConfigError
from unfog_autoencoders.losses import (
    PatchDiscriminator,
    adaptive_weight,
    decoder_last_layer,
    generator_loss,
    hinge_discriminator_loss,
    kl_divergence,
    patch_grid,
    perceptual_distance,
    reconstruction_loss,
)


def test_hinge_losses_have_their_values() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])  # max(0, 1 − D(x)): 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])  # max(0, 1 + D(x̂)): 0, 1, 2
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3 / 3))
    assert hinge_discriminator_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0.0  # margins met
    assert generator_loss(fake).item() == pytest.approx(1 / 3)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer_clamped() -> None:
    w = nn.Parameter(torch.randn(3, 4))
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    nll, g = (w * a).sum(), (w * b).sum()  # gradients a and b
    value = adaptive_weight(nll, g, w, weight=0.5)
    assert value.item() == pytest.approx(0.5 * (a.norm() / (b.norm() + 1e-4)).item(), rel=1e-6)
    assert not value.requires_grad
    tiny = adaptive_weight((w * a).sum(), (w * b * 1e-12).sum(), w)  # a vanishing adversarial gradient
    assert tiny.item() == 1e4
    assert adaptive_weight((w * 0).sum(), (w * b).sum(), w).item() == 0.0


def test_kl_divergence_matches_torch_distributions() -> None:
    mean, std = torch.randn(5, 4, 3, 3), torch.rand(5, 4, 3, 3) + 0.05
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                                 torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1).mean()
    assert kl_divergence(mean, std).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl_divergence(torch.zeros(2, 3), torch.ones(2, 3)).item() == 0.0  # the prior itself
    assert torch.isfinite(kl_divergence(mean, torch.zeros_like(std)))  # a deterministic encoder


def test_reconstruction_losses_sum_over_each_image() -> None:
    x = torch.zeros(2, 1, 2, 2)
    x_rec = torch.tensor([[[[1.0, -1.0], [2.0, 0.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    assert reconstruction_loss(x, x_rec, "l1").tolist() == [4.0, 2.0]
    assert reconstruction_loss(x, x_rec, "l2").tolist() == [6.0, 1.0]
    with pytest.raises(ConfigError, match="loss.reconstruction must be one of l1, l2; got 'l3'"):
        reconstruction_loss(x, x_rec, "l3")


@pytest.mark.parametrize(("side", "layers"), [(16, 1), (16, 2), (64, 3), (256, 3)])
def test_patch_discriminator_gives_the_logit_map_patch_grid_predicts(side: int, layers: int) -> None:
    d = PatchDiscriminator(3, channels=8, layers=layers)
    out = d(torch.randn(2, 3, side, side))
    assert out.shape == (2, 1, patch_grid(side, layers), patch_grid(side, layers))
    assert patch_grid(256, 3) == 30  # pix2pix's 70×70 PatchGAN on 256×256 images
    assert patch_grid(16, 3) < 1


def test_the_last_layer_of_the_kl_decoder_is_its_output_convolution() -> None:
    ae = unfog.create("autoencoder", "kl", data_shape=(3, 16, 16), channels=8, norm_groups=4, factor=2)
    found = decoder_last_layer(ae, torch.zeros(1, *ae.latent_shape((3, 16, 16))))
    assert found is ae.decoder.conv_out.weight


def test_perceptual_distance_is_refused_without_what_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="needs loss.perceptual.extractor_weights=FOLDER"):
        perceptual_distance("classifier", None, (3, 16, 16))
    monkeypatch.setitem(sys.modules, "lpips", None)  # not installed
    with pytest.raises(ConfigError, match="extractor=lpips needs the lpips package"):
        perceptual_distance("lpips", None, (3, 16, 16))


def test_the_differentiable_inception_features_are_torch_fidelitys(monkeypatch: pytest.MonkeyPatch) -> None:
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from unfog_autoencoders.losses import inception_pool3

    # a randomly initialised network: the test compares computations, not weights
    monkeypatch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    expected = net(images)[0]
    x = (images.float() / 127.5 - 1.0).requires_grad_(True)
    ours = inception_pool3(net, x)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    ours.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_reads_the_vgg_weights_from_a_local_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lpips")
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty cache
    with pytest.raises(ConfigError, match="needs torchvision's VGG-16 weights vgg16-397923af.pth, not found"):
        perceptual_distance("lpips", None, (3, 32, 32))
    torch.manual_seed(0)  # a file with the keys and shapes of torchvision's, and random values
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), tmp_path / "vgg16-397923af.pth")
    distance, about = perceptual_distance("lpips", str(tmp_path), (3, 32, 32))
    assert about["name"] == "lpips-vgg" and len(about["weights_sha256"]) == 64
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    d = distance(x, y)
    assert d.shape == (2,) and (d > 0).all() and distance(x, x).abs().max() < 1e-6
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
