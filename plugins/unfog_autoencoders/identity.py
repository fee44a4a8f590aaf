"""Pixel space: the autoencoder that does nothing, the default of every training config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from unfog import register
from unfog.protocols import Posterior


@register("autoencoder", "identity")
class Identity(nn.Module):
    """Pixel space: latents are the data themselves, so a model trains on pixels.

    The identity first stage of Stability's generative-models (``IdentityFirstStage``): encode
    gives the data as the posterior mean with zero standard deviation, decode gives the latents
    back. It is ``lossless``, so the kernel skips the first stage altogether (no cache, no
    normalisation). Any data rank works: points (D,), sound (C, L), images (C, H, W).
    """

    lossless: ClassVar[bool] = True
    flip_equivariant: ClassVar[bool] = True

    def __init__(self, data_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.data_shape = tuple(data_shape) if data_shape is not None else None

    def encode(self, x: Tensor) -> Posterior:
        """The data as the posterior mean, with zero standard deviation."""
        return Posterior(x, torch.zeros_like(x))

    def decode(self, z: Tensor) -> Tensor:
        """The latents, which are the data."""
        return z

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        """The data's own shape."""
        return tuple(int(s) for s in data_shape)

    def settings(self) -> dict[str, Any]:
        """Nothing to record: there is no network."""
        return {}
