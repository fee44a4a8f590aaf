"""Class-label conditioning with a learned null class."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from unfog import register
from unfog.errors import ConfigError, DataError


@register("conditioner", "class_label")
class ClassLabel(nn.Module):
    """Embeds an integer class label; index ``num_classes`` is the learned null class used
    for classifier-free guidance (Ho & Salimans 2022), chosen with probability ``dropout``
    during training.

    Args:
        num_classes: number of classes (taken from the dataset).
        dim: embedding width.
        dropout: probability of replacing a label by the null class while training.
        field: the batch field holding the label.
    """

    route = "vector"

    def __init__(self, num_classes: int, dim: int = 128, dropout: float = 0.1, field: str = "label") -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"class_label: num_classes must be at least 1; got {num_classes}.")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"class_label: dropout must lie in [0, 1); got {dropout}.")
        self.num_classes = num_classes
        self.dim = dim
        self.dropout = dropout
        self.field = field
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, value: Any, drop: Tensor | None = None) -> Tensor:
        """Embed labels (B,); rows where ``drop`` is true get the null class."""
        labels = torch.as_tensor(value, device=self.embedding.weight.device)
        if labels.is_floating_point() or labels.ndim != 1:
            raise DataError(
                f"class_label: field {self.field!r} must be a 1-D tensor of integer labels; "
                f"got dtype {labels.dtype} and shape {tuple(labels.shape)}."
            )
        labels = labels.long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise DataError(
                f"class_label: field {self.field!r} holds labels outside 0..{self.num_classes - 1} "
                f"(min {int(labels.min())}, max {int(labels.max())}); {self.num_classes} means 'no label'."
            )
        if drop is not None:
            labels = torch.where(drop.to(labels.device), torch.full_like(labels, self.num_classes), labels)
        return self.embedding(labels)

    def null_value(self, n: int) -> Tensor:
        """``n`` null labels."""
        return torch.full((n,), self.num_classes, dtype=torch.long)
