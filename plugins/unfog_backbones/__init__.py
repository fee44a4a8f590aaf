"""First-party backbones; importing this package registers them.

Optional libraries (timm, diffusers) are imported only when such a backbone is built.
"""

from unfog_backbones import auto, dit, embeddings, mlp, unet

__all__ = ["auto", "dit", "embeddings", "mlp", "unet"]
