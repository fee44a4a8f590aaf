"""First-party samplers; importing this package registers them."""

from unfog_samplers import ddim, ddpm

__all__ = ["ddim", "ddpm"]
