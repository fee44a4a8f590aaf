"""diffusers interoperability; importing this package registers its components.

``models``: diffusers' U-Nets and DiT, and any diffusers model folder, as backbones
(``diffusers_unet``, ``diffusers_transformer``, ``diffusers_folder``). ``export``: the
``format=diffusers`` exporter (``unfog export ... format=diffusers``). diffusers itself is
imported only when one of them is built or run.
"""

from unfog_diffusers import export, models, vae

__all__ = ["export", "models", "vae"]
