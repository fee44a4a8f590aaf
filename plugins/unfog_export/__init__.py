"""First-party exporters (``unfog export format=NAME``); importing this package registers them."""

from unfog_export import safetensors

__all__ = ["safetensors"]
