"""The losses of a KL-regularised autoencoder as Rombach et al. (2022, "High-resolution image
synthesis with latent diffusion models", LDM) train it: a pixel reconstruction term, a small KL
penalty, an optional perceptual term and an optional PatchGAN with LDM's adaptive weight.

Pure functions on tensors, plus the two networks the terms need: :class:`PatchDiscriminator`
and :func:`perceptual_distance` (a frozen feature network that gradients pass through).
Reductions follow LDM's ``LPIPSWithDiscriminator``: the reconstruction and KL terms are summed
over each image's pixels (latent elements) and averaged over the batch, so ``kl_weight=1e-6``
means what it means there.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unfog.errors import ConfigError
from unfog.util import sha256_of, version_of

RECONSTRUCTIONS = ("l1", "l2")
PERCEPTUAL_EXTRACTORS = ("classifier", "inception", "lpips")
ADAPTIVE_WEIGHT_MAX = 1e4  # LDM clamps the adaptive weight to [0, 1e4]
ADAPTIVE_WEIGHT_EPS = 1e-4  # δ in the denominator (Esser et al. 2021)

Distance = Callable[[Tensor, Tensor], Tensor]
"""(images, reconstructions) → one perceptual distance per image, differentiable in the second."""


def reconstruction_loss(x: Tensor, x_rec: Tensor, kind: str = "l1") -> Tensor:
    """|x − x̂| (``l1``) or (x − x̂)² (``l2``) summed over each image: a tensor of shape (B,)."""
    if kind not in RECONSTRUCTIONS:
        raise ConfigError(f"loss.reconstruction must be one of {', '.join(RECONSTRUCTIONS)}; got {kind!r}.")
    diff = x_rec.float() - x.float()
    per_pixel = diff.abs() if kind == "l1" else diff.square()
    return per_pixel.flatten(1).sum(dim=1)


def kl_divergence(mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²) (Kingma & Welling 2014, App. B),
    summed over each latent and averaged over the batch. σ = 0 (a deterministic encoder) is
    read as the smallest positive float, so the value stays finite."""
    mean, std = mean.float(), std.float()
    var = std.square().clamp_min(torch.finfo(torch.float32).tiny)
    return 0.5 * (mean.square() + var - 1.0 - var.log()).flatten(1).sum(dim=1).mean()


def hinge_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """The discriminator's hinge loss ½ (E[max(0, 1 − D(x))] + E[max(0, 1 + D(x̂))]) (Lim & Ye 2017,
    "Geometric GAN"; the ½ as in LDM's ``hinge_d_loss``)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: Tensor) -> Tensor:
    """The autoencoder's adversarial loss −E[D(x̂)] (the generator side of the hinge GAN)."""
    return -logits_fake.mean()


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, weight: float = 1.0) -> Tensor:
    """λ = ‖∇_L nll‖ / (‖∇_L g‖ + δ), clamped to [0, 10⁴] and times ``weight`` (Esser et al. 2021,
    "Taming transformers", Eq. 7; LDM's ``calculate_adaptive_weight``): the gradient norms of the
    reconstruction and adversarial losses at the decoder's last layer L, so neither term drowns
    the other. Detached: it scales the adversarial term, it is not trained through."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    ratio = nll_grad.norm() / (g_grad.norm() + ADAPTIVE_WEIGHT_EPS)
    return ratio.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach() * weight


def decoder_last_layer(autoencoder: nn.Module, latent: Tensor) -> Tensor:
    """The weight of the last layer ``decode`` applies: ``autoencoder.last_layer()`` when it
    has one, else the first weight (a parameter of 2 or more dimensions) met walking the
    autograd graph of ``decode(latent)`` back from its output."""
    own = getattr(autoencoder, "last_layer", None)
    if callable(own):
        return own()
    if isinstance(own, Tensor):
        return own
    with torch.enable_grad():
        out = autoencoder.decode(latent)
    params = {id(p) for p in autoencoder.parameters()}
    frontier, seen = [out.grad_fn], set()
    while frontier:  # breadth first: nearest to the output first
        following = []
        for fn in frontier:
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            variable = getattr(fn, "variable", None)
            if variable is not None and variable.ndim >= 2 and id(variable) in params:
                return variable
            following.extend(f for f, _ in fn.next_functions)
        frontier = following
    raise ConfigError(
        f"loss.discriminator: no trainable weight found in {type(autoencoder).__name__}.decode, which the "
        "adaptive weight needs; give the autoencoder a last_layer() method returning its last weight."
    )


class PatchDiscriminator(nn.Module):
    """The PatchGAN discriminator of Isola et al. (2017, "Image-to-image translation with conditional
    adversarial networks"), as taming-transformers and LDM build it (``NLayerDiscriminator``):
    4×4 convolutions, ``layers`` of them with stride 2 (channels doubling up to 8× ``channels``),
    one with stride 1, BatchNorm and LeakyReLU(0.2), and a last one to one logit per patch.

    Args:
        in_channels: image channels.
        channels: channels of the first convolution.
        layers: convolutions with stride 2.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            previous, mult = mult, min(2 ** n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(channels * previous, channels * mult, 4, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, 1, h, w), one per overlapping patch."""
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    """taming-transformers' ``weights_init``: convolutions N(0, 0.02), BatchNorm scales N(1, 0.02)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def patch_grid(side: int, layers: int) -> int:
    """The side of a :class:`PatchDiscriminator`'s logit map for images ``side`` pixels across."""
    for _ in range(layers):
        side = (side + 2 - 4) // 2 + 1
    return side - 2  # the two stride-1 convolutions each take one off


# ------------------------------------------------------------------------------- perceptual


def perceptual_distance(extractor: str, weights: str | None, data_shape: Sequence[int],
                        device: Any = "cpu") -> tuple[Distance, dict[str, Any]]:
    """A differentiable perceptual distance and what it is (name, weights, their sha256).

    ``classifier`` and ``inception`` give the mean squared distance between the penultimate
    (classifier) or pool3 (Inception-v3) features of images and reconstructions, through the
    same networks and weights as :func:`unfog_metrics.features.extractor_from`; ``lpips`` gives
    the LPIPS distance (Zhang et al. 2018) of the ``lpips`` package with a VGG-16 whose weights
    are read from ``weights`` or torchvision's cache, never downloaded.
    """
    from unfog_metrics.features import extractor_from

    if extractor == "lpips":
        return _lpips_distance(weights, data_shape, device)
    if extractor not in PERCEPTUAL_EXTRACTORS:
        raise ConfigError(f"loss.perceptual.extractor must be one of {', '.join(PERCEPTUAL_EXTRACTORS)}; "
                          f"got {extractor!r}.")
    if extractor == "classifier" and not weights:
        raise ConfigError(
            "loss.perceptual.extractor=classifier needs loss.perceptual.extractor_weights=FOLDER: a classifier "
            "trained on this data by `unfog train-classifier dataset=NAME` (the folder it prints)."
        )
    ext = extractor_from(extractor, weights, device=str(device))
    if extractor == "classifier":
        if tuple(ext.data_shape) != tuple(data_shape):
            raise ConfigError(
                f"loss.perceptual.extractor_weights: the classifier at {weights} takes images of shape "
                f"{tuple(ext.data_shape)}, this dataset's are {tuple(data_shape)}; train one on this dataset."
            )
        lo, hi = ext.data_range or (-float("inf"), float("inf"))
        features = lambda x: ext.net.features(x.clamp(lo, hi))  # noqa: E731
    else:
        features = lambda x: inception_pool3(ext.network, x)  # noqa: E731

    def distance(x: Tensor, x_rec: Tensor) -> Tensor:
        with torch.no_grad():
            target = features(x.float())
        return (features(x_rec.float()) - target).square().mean(dim=1)

    return distance, ext.describe()


def inception_pool3(network: nn.Module, images: Tensor) -> Tensor:
    """torch-fidelity's Inception-v3 pool3 features (N × 2048) of images in [-1, 1], differentiable:
    its forward pass on floats (x + 1)·127.5 instead of rounded uint8, otherwise step for step."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = (images.clamp(-1.0, 1.0) + 1.0) * 127.5
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(network.INPUT_IMAGE_SIZE,) * 2, align_corners=False)
    x = (x - 128) / 128
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                 "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"):
        x = getattr(network, name)(x)
    return torch.flatten(x, 1)


LPIPS_BACKBONE_FILE = "vgg16-397923af.pth"  # torchvision's VGG-16 (ImageNet) weights, which lpips builds on


def _lpips_distance(weights: str | None, data_shape: Sequence[int], device: Any) -> tuple[Distance, dict[str, Any]]:
    try:
        import lpips
    except ImportError as exc:
        raise ConfigError(
            f"loss.perceptual.extractor=lpips needs the lpips package ({exc}); `pip install lpips`, then give its "
            f"VGG-16 backbone weights ({LPIPS_BACKBONE_FILE}, which cannot be downloaded here) as "
            "loss.perceptual.extractor_weights=FILE. Or use extractor=classifier with a `unfog train-classifier` "
            "folder."
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILE
    path = Path(weights).expanduser() if weights else cached
    if path.is_dir():
        path = path / LPIPS_BACKBONE_FILE
    if not path.is_file():
        raise ConfigError(
            f"loss.perceptual.extractor=lpips needs torchvision's VGG-16 weights {LPIPS_BACKBONE_FILE}, not found at "
            f"{path}; they cannot be downloaded here. Copy the file from a machine with network access (torchvision "
            f"keeps it in {cached.parent}) and pass loss.perceptual.extractor_weights=FILE."
        )
    if len(data_shape) != 3 or data_shape[0] not in (1, 3):
        raise ConfigError(f"loss.perceptual.extractor=lpips takes grey or RGB images; got shape {tuple(data_shape)}.")
    with warnings.catch_warnings():  # torchvision's notes on lpips' use of its deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)  # heads ship with lpips
    backbone = torch.load(path, map_location="cpu", weights_only=True)
    try:
        state = {name: backbone[f"features.{name.split('.', 1)[1]}"] for name in net.net.state_dict()}
        net.net.load_state_dict(state)
    except (KeyError, RuntimeError) as exc:
        raise ConfigError(f"{path} does not hold torchvision's VGG-16 weights ({type(exc).__name__}: {exc}).") from None
    net = net.to(device).eval().requires_grad_(False)

    def distance(x: Tensor, x_rec: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x, x_rec = x.repeat(1, 3, 1, 1), x_rec.repeat(1, 3, 1, 1)
        return net(x_rec.float(), x.float()).flatten()

    about = {"name": "lpips-vgg", "weights": str(path), "weights_sha256": sha256_of(path),
             "implementation": f"lpips {version_of('lpips')} (linear heads v0.1)"}
    return distance, about
