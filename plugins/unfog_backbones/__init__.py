"""First-party backbones; importing this package registers them.

Optional libraries (timm, diffusers) are imported only when such a backbone is built.
"""

from unfog_backbones import diffusers_models, dit, embeddings, mlp, unet, unet1d

__all__ = ["diffusers_models", "dit", "embeddings", "mlp", "unet", "unet1d"]
