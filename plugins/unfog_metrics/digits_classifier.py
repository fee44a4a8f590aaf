"""Class-conditional accuracy of generated 8×8 digits, judged by a classifier of real digits."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from unfog import register
from unfog.errors import DataError
from unfog_datasets.digits import check_test_fraction, digits_split
from unfog_metrics._common import requested_labels

NUM_CLASSES = 10
# An RBF support vector machine on pixel values 0..16; gamma and C were chosen by 5-fold
# cross-validation on the training split only (≈ 99 % test accuracy, trains in ≈ 0.1 s).
SVC_GAMMA = 0.001
SVC_C = 1.0


def _features(images: Tensor) -> np.ndarray:
    """N×1×8×8 images in [-1, 1] → N×64 float64 pixel values 0..16 (the classifier's input)."""
    return ((images.reshape(len(images), -1).double().clamp(-1.0, 1.0) + 1.0) * 8.0).numpy()


@functools.lru_cache(maxsize=4)
def trained_digits_classifier(test_fraction: float = 0.2) -> tuple[Any, float]:
    """The classifier trained on the digits training split and its accuracy on the test split.

    Cached: building the metric again does not retrain.
    """
    try:
        from sklearn.svm import SVC
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DataError(
            f"digits_classifier: scikit-learn could not be imported ({exc}); run `pip install scikit-learn`."
        ) from exc
    x_train, y_train = digits_split("train", test_fraction)
    x_test, y_test = digits_split("test", test_fraction)
    clf = SVC(gamma=SVC_GAMMA, C=SVC_C)
    clf.fit(_features(x_train), y_train.numpy())
    accuracy = float(np.mean(clf.predict(_features(x_test)) == y_test.numpy()))
    return clf, accuracy


@register("metric", "digits_classifier")
class DigitsClassifierAccuracy:
    """Share of generated digits that a classifier of real digits assigns to the requested class.

    The classifier (an RBF SVM) is trained on the training split of the ``digits`` dataset
    (same ``test_fraction``, same fixed split); its accuracy on the test split, about 99 %,
    is ``classifier_test_accuracy`` and bounds what a perfect generator can score. Generated
    images must be N×1×8×8 in [-1, 1] (values outside are clipped); images upscaled by an
    integer factor (N×1×8k×8k, as from ``digits`` with ``upscale=k``) are average-pooled
    back to 8×8. Non-finite samples count as wrong. ``real`` is ignored.

    ``compute()`` gives ``accuracy`` (over all samples), ``per_class_min`` (the lowest
    accuracy of any requested class) and ``n`` (the number of samples).

    Args:
        test_fraction: share of each class the digits split holds out (as in the dataset).
    """

    def __init__(self, test_fraction: float = 0.2) -> None:
        self.test_fraction = check_test_fraction("digits_classifier", test_fraction)
        self._classifier, self._test_accuracy = trained_digits_classifier(self.test_fraction)
        self._predicted: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    @property
    def classifier_test_accuracy(self) -> float:
        """The classifier's own accuracy on the real test-split digits."""
        return self._test_accuracy

    def reset(self) -> None:
        """Forget every sample seen so far."""
        self._predicted.clear()
        self._labels.clear()

    def predict(self, images: Tensor) -> Tensor:
        """The classifier's class for each image (N×1×8×8 in [-1, 1]); -1 for non-finite ones."""
        x = self._to_8x8(images)
        finite = torch.isfinite(x).flatten(1).all(dim=1)
        predicted = np.full(len(x), -1, dtype=np.int64)
        if bool(finite.any()):
            predicted[finite.numpy()] = self._classifier.predict(_features(x[finite]))
        return torch.from_numpy(predicted)

    def update(self, *, generated: Tensor, labels: Tensor | None = None, real: Tensor | None = None) -> None:
        """Classify ``generated`` and compare with the classes ``labels`` they were generated for."""
        labels_t = requested_labels(
            "digits_classifier", labels, NUM_CLASSES, len(generated),
            missing="Use it with a class-conditional model on the digits dataset, or remove this metric "
            "from the config.",
        )
        self._predicted.append(self.predict(generated).numpy())
        self._labels.append(labels_t.numpy())

    def compute(self) -> dict[str, float]:
        """``accuracy``, ``per_class_min`` and ``n`` over every sample since the last reset."""
        if not self._labels or sum(len(y) for y in self._labels) == 0:
            raise DataError("digits_classifier: no samples to score; call update() with samples first.")
        predicted = np.concatenate(self._predicted)
        labels = np.concatenate(self._labels)
        correct = predicted == labels
        per_class = [float(correct[labels == c].mean()) for c in np.unique(labels)]
        return {"accuracy": float(correct.mean()), "per_class_min": min(per_class), "n": float(len(labels))}

    def _to_8x8(self, images: Tensor) -> Tensor:
        x = torch.as_tensor(images).detach().to("cpu", torch.float32)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3] or x.shape[2] % 8:
            raise DataError(
                "digits_classifier: generated samples must be N×1×8×8 greyscale digits (or N×1×8k×8k "
                f"when upscaled); got shape {tuple(x.shape)}. Use it with the digits dataset."
            )
        k = x.shape[2] // 8
        return F.avg_pool2d(x, k) if k > 1 else x

    def __repr__(self) -> str:
        return (
            f"DigitsClassifierAccuracy(test_fraction={self.test_fraction}, "
            f"classifier_test_accuracy={self._test_accuracy:.4f})"
        )
