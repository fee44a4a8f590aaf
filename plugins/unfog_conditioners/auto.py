"""``conditioner=auto``: the conditioning the data supports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unfog import register
from unfog.errors import ConfigError


@register("conditioner", "auto")
class AutoConditioner:
    """The conditioners the data supports: class_label when it has labels, else text when it has
    captions, else none (unconditional). Chosen before training and stored in the checkpoint."""

    route = "vector"  # not a conditioner itself: resolve() replaces it before anything is built

    def __init__(self) -> None:
        raise ConfigError("conditioner=auto is replaced by the conditioners it chooses for the data before a "
                          "model is built; build class_label or text directly.")

    @staticmethod
    def resolve(fields: Sequence[str] = (), num_classes: int | None = None) -> dict[str, Any]:
        """``{key: node}`` of the chosen conditioners (possibly none)."""
        if num_classes and "label" in fields:
            return {"class_label": {"_name_": "class_label"}}
        if "caption" in fields:
            return {"text": {"_name_": "text"}}
        return {}
