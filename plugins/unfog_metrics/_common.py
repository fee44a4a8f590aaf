"""Checks shared by the metrics that score samples against the class they were generated for."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from unfog.errors import ConfigError, DataError


def requested_labels(metric: str, labels: Any, num_classes: int, num_samples: int | None = None,
                     missing: str = "", classes: str = "") -> Tensor:
    """``labels`` as a 1-D int64 CPU tensor of classes in 0..``num_classes``−1, one per sample.

    Raises ConfigError when ``labels`` is None (``missing`` says what to do instead) and
    DataError for float, multi-dimensional or out-of-range labels (``classes`` describes the
    classes) or a count other than ``num_samples``.
    """
    if labels is None:
        hint = missing or "Use it with a class-conditional model, or remove this metric from the config."
        raise ConfigError(f"{metric}: needs the class each sample was generated for, but labels=None was given. {hint}")
    labels_t = torch.as_tensor(labels).detach().cpu()
    if labels_t.is_floating_point() or labels_t.ndim != 1:
        raise DataError(f"{metric}: labels must be a 1-D tensor of integer classes; got dtype {labels_t.dtype} "
                        f"and shape {tuple(labels_t.shape)}.")
    if labels_t.numel() and (int(labels_t.min()) < 0 or int(labels_t.max()) >= num_classes):
        raise DataError(f"{metric}: labels must lie in 0..{num_classes - 1}{classes}; got min {int(labels_t.min())}, "
                        f"max {int(labels_t.max())}.")
    if num_samples is not None and num_samples != len(labels_t):
        raise DataError(f"{metric}: got {num_samples} generated samples but {len(labels_t)} labels; "
                        "pass one label per sample.")
    return labels_t.long()
