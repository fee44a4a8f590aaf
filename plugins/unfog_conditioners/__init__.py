"""First-party conditioners; importing this package registers them."""

from unfog_conditioners import class_label, scalar

__all__ = ["class_label", "scalar"]
