"""First-party backbones; importing this package registers them."""

from unfog_backbones import embeddings, mlp, unet

__all__ = ["embeddings", "mlp", "unet"]
