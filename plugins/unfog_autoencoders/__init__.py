"""First-party autoencoders, the first stage of latent diffusion; importing this package registers
them: ``identity`` (pixel space, the default) and ``kl`` (LDM's KL-regularised autoencoder,
trained by ``unfog train-autoencoder``)."""

from unfog_autoencoders import identity, kl

__all__ = ["identity", "kl"]
