"""First-party noise schedules; importing this package registers them."""

from unfog_schedules import cosine, linear

__all__ = ["cosine", "linear"]
