"""First-party noise schedules; importing this package registers them."""

from unfog_schedules import cosine, edm, linear, rectified_flow, sigmoid

__all__ = ["cosine", "edm", "linear", "rectified_flow", "sigmoid"]
