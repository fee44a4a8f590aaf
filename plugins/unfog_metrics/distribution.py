"""Feature-distribution metrics of generated images: FID, KID, Inception Score, precision/recall.

Each metric turns images into features with a feature extractor (:mod:`unfog_metrics.features`:
FID's Inception-v3 by default, or an in-domain classifier) and compares them with reference
features of real images: from ``set_reference`` (a dataset, cached by :mod:`unfog_metrics.reference`),
from ``update(real=...)``, or from a ``reference=FILE.npz``. ``protocol()`` records all of it.

The formulas are pure functions below, usable on any features.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from unfog import register
from unfog.errors import ConfigError, DataError
from unfog.util import resolve_device
from unfog_metrics.features import FeatureExtractor, check_images, extractor_from
from unfog_metrics.reference import Reference, load_reference_file, reference_features

# --- formulas ------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (divided by N − 1) of N×D features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂) (Dowson & Landau, 1982), FID's formula
    (Heusel et al., 2017, "GANs trained by a two time-scale update rule converge to a local Nash
    equilibrium"): ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½.

    tr (Σ₁Σ₂)^½ is computed as Σᵢ √λᵢ of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½, which has the same
    eigenvalues as Σ₁Σ₂: two symmetric eigendecompositions in float64, no complex parts and no
    ε-regularisation of singular covariances needed. Rounding below zero is clipped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise DataError(
            f"frechet_distance: mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs "
            f"{s2.shape}; the two feature sets must come from the same extractor."
        )
    root1 = _psd_sqrt(s1)
    inner = root1 @ s2 @ root1
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased estimate of MMD² between samples ``x`` and ``y`` (m each) with the polynomial kernel
    k(a, b) = (a·b / d + coef)^degree (Bińkowski et al., 2018, "Demystifying MMD GANs", eq. 3):
    mean of k over distinct pairs within x and within y, minus twice the mean over all x–y pairs."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, d = x.shape
    k_xx = (x @ x.T / d + coef) ** degree
    k_yy = (y @ y.T / d + coef) ** degree
    k_xy = (x @ y.T / d + coef) ** degree
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al., 2018): the unbiased polynomial-kernel MMD² (:func:`polynomial_mmd2`) over
    ``subsets`` random subsets of ``min(subset_size, len(real), len(fake))`` items of each set, drawn
    without replacement by a generator seeded with ``seed``; returns the mean and the standard
    deviation over subsets (population std, as torch-fidelity and torchmetrics)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise DataError(f"kid: needs at least 2 real and 2 generated samples; got {len(real)} and {len(fake)}.")
    rng = np.random.default_rng(seed)
    scores = [polynomial_mmd2(real[rng.choice(len(real), m, replace=False)],
                              fake[rng.choice(len(fake), m, replace=False)]) for _ in range(subsets)]
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits: np.ndarray | Tensor, splits: int = 10, shuffle_seed: int | None = 2020
                    ) -> tuple[float, float]:
    """Inception Score (Salimans et al., 2016, "Improved techniques for training GANs"):
    exp(E_x KL(p(y|x) ‖ p(y))) on each of ``splits`` equal parts (at most one per sample), with p(y)
    the part's mean prediction; returns the mean and (population) std over parts.

    Samples are first permuted with ``np.random.RandomState(shuffle_seed)`` as torch-fidelity does
    (seed 2020), so class-ordered samples do not make single-class parts; None keeps their order.
    """
    z = torch.as_tensor(np.asarray(logits, np.float64))
    n = len(z)
    if z.ndim != 2 or n < 1:
        raise DataError(f"inception_score: needs (N, K) logits with N ≥ 1; got shape {tuple(z.shape)}.")
    if shuffle_seed is not None:
        z = z[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(n))]
    splits = max(1, min(splits, n))
    p, log_p = z.softmax(dim=1), z.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        part = slice(i * n // splits, (i + 1) * n // splits)
        log_q = p[part].mean(dim=0, keepdim=True).log()
        scores.append(float((p[part] * (log_p[part] - log_q)).sum(dim=1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def knn_radii(features: Tensor, k: int = 3, batch_size: int = 1024) -> Tensor:
    """Distance from each row to its k-th nearest other row (the row itself excluded), in batches."""
    out = [torch.cdist(features[i:i + batch_size], features).kthvalue(k + 1, dim=1).values
           for i in range(0, len(features), batch_size)]
    return torch.cat(out)


def _coverage(points: Tensor, centres: Tensor, radii: Tensor, batch_size: int) -> float:
    """Share of ``points`` inside at least one ball (centre, radius)."""
    inside = [(torch.cdist(points[i:i + batch_size], centres) <= radii[None]).any(dim=1)
              for i in range(0, len(points), batch_size)]
    return float(torch.cat(inside).double().mean())


def _float64(a: np.ndarray | Tensor, device: str | torch.device) -> Tensor:
    return a.to(device, torch.float64) if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a, np.float64),
                                                                                     device=device)


def precision_recall(real: np.ndarray | Tensor, fake: np.ndarray | Tensor, k: int = 3, batch_size: int = 1024,
                     device: str | torch.device = "cpu", real_radii: Tensor | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019, "Improved precision and recall metric
    for assessing generative models"): each set's manifold is the union of balls around its samples
    with radius the distance to the k-th nearest neighbour in the same set; precision is the share of
    generated samples inside the real manifold, recall the share of real samples inside the
    generated one. Distances in float64, ``batch_size`` rows at a time; ``real_radii`` may be
    passed when already known."""
    r, f = _float64(real, device), _float64(fake, device)
    if len(r) <= k or len(f) <= k:
        raise DataError(f"precision_recall: needs more than k={k} real and generated samples; "
                        f"got {len(r)} and {len(f)}.")
    radii_r = knn_radii(r, k, batch_size) if real_radii is None else real_radii.to(device, torch.float64)
    radii_f = knn_radii(f, k, batch_size)
    return _coverage(f, r, radii_r, batch_size), _coverage(r, f, radii_f, batch_size)


# --- metrics -------------------------------------------------------------------------------------


class _FeatureMetric:
    """Shared parts: the extractor and the accumulated features of generated samples."""

    name: ClassVar[str] = ""

    def __init__(self, extractor: str | FeatureExtractor, weights: str | None, batch_size: int, device: str) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"{self.name}: batch_size must be a positive integer; got {batch_size!r}.")
        self.extractor = extractor_from(extractor, weights, device=device, batch_size=batch_size)
        self.weights = weights
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self._generated: list[np.ndarray] = []

    def _add(self, store: list[np.ndarray], images: Tensor) -> None:
        x = check_images(images, self.name)
        if len(x):
            store.append(np.asarray(self.extractor.features(x), dtype=np.float64))

    def _generated_features(self, minimum: int) -> np.ndarray:
        n = sum(len(g) for g in self._generated)
        if n < minimum:
            raise DataError(f"{self.name}: needs at least {minimum} generated samples; got {n}. "
                            "Call update(generated=...) with more samples.")
        return np.concatenate(self._generated)

    def reset(self) -> None:
        """Forget the generated samples."""
        self._generated.clear()

    def _arguments(self) -> dict[str, Any]:
        return {"extractor": self.extractor.name, "weights": self.weights, "batch_size": self.batch_size}

    def protocol(self) -> dict[str, Any]:
        """JSON-able: metric, arguments, feature extractor and number of generated samples."""
        return {"metric": self.name, "arguments": self._arguments(), "feature_extractor": self.extractor.describe(),
                "reference": None, "num_generated": int(sum(len(g) for g in self._generated))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(extractor={self.extractor.name!r})"


class _ComparisonMetric(_FeatureMetric):
    """A feature metric against a reference: from set_reference (a dataset, cached), update(real=) or a file."""

    def __init__(self, extractor: str | FeatureExtractor, weights: str | None, reference_samples: int,
                 reference: str | None, batch_size: int, device: str) -> None:
        if not isinstance(reference_samples, int) or reference_samples < 2:
            raise ConfigError(f"{self.name}: reference_samples must be an integer ≥ 2; got {reference_samples!r}.")
        super().__init__(extractor, weights, batch_size, device)
        self.reference_samples = reference_samples
        self._reference: Reference | None = load_reference_file(reference) if reference else None
        self._real: list[np.ndarray] = []

    def set_reference(self, dataset: Any, dataset_config: Mapping[str, Any]) -> None:
        """Take the reference from ``dataset``: features of ``reference_samples`` items, cached by hash."""
        if len(dataset) > 0:
            check_images(torch.as_tensor(dataset[0]["x"])[None], self.name)
        self._reference = reference_features(self.extractor, dataset, dataset_config, self.reference_samples,
                                             batch_size=self.batch_size)

    def update(self, *, generated: Tensor, labels: Tensor | None = None, real: Tensor | None = None) -> None:
        """Add the features of ``generated`` images, and of ``real`` ones: when given, these are the
        reference (instead of a set reference or file)."""
        self._add(self._generated, generated)
        if real is not None:
            self._add(self._real, real)

    def reset(self) -> None:
        """Forget the generated (and update()-given real) samples; a set reference is kept."""
        super().reset()
        self._real.clear()

    def _reference_features(self) -> np.ndarray:
        if self._real:
            return np.concatenate(self._real)
        if self._reference is None:
            raise DataError(
                f"{self.name}: no reference (real) features. Call set_reference(dataset, dataset_config) "
                "(unfog evaluate and the training callback do), pass real=images to update(), or set "
                f"reference=FILE.npz (metric.{self.name}.reference=PATH) with precomputed 'features'."
            )
        if self._reference.features is None:
            raise DataError(
                f"{self.name}: the reference file {self._reference.path} holds only 'mu' and 'sigma', which suffice "
                "for fid only; give an .npz with 'features' (N×D) instead."
            )
        return self._reference.features

    def _arguments(self) -> dict[str, Any]:
        return {**super()._arguments(), "reference_samples": self.reference_samples}

    def protocol(self) -> dict[str, Any]:
        """JSON-able: metric, arguments, feature extractor, reference and number of generated samples."""
        out = super().protocol()
        if self._real:
            out["reference"] = {"source": "real", "num": int(sum(len(r) for r in self._real))}
        elif self._reference is not None:
            out["reference"] = self._reference.describe()
        return out


@register("metric", "fid")
class FID(_ComparisonMetric):
    """Fréchet Inception Distance between generated and real images (Heusel et al., 2017).

    The Fréchet distance (:func:`frechet_distance`) between Gaussians fitted to the extractor's
    features of generated and of reference images. Lower is better; figures depend on the number
    of samples (biased upward for small N) and on the extractor, so compare only with the same
    ``protocol()``. Needs images (N×C×H×W, C 1 or 3, in [-1, 1]); for toy2d points use
    ``sliced_wasserstein`` or ``mmd``.

    Args:
        extractor: ``inception`` (torch-fidelity's Inception-v3, 2048-d pool features) or
            ``classifier`` (a classifier from ``unfog train-classifier``). From Python, a
            :class:`~unfog_metrics.features.FeatureExtractor` object is accepted too.
        weights: the extractor's weight file (inception: optional, see the error message when
            missing; classifier: the folder or .safetensors written by ``unfog train-classifier``).
        reference_samples: real items whose features form the reference (all if fewer).
        reference: an .npz with precomputed reference ``features`` (N×D) or ``mu``/``sigma``.
        batch_size: images per forward pass of the extractor.
        device: where the extractor runs (``auto``: CUDA when available).
    """

    name = "fid"

    def __init__(self, extractor: str = "inception", weights: str | None = None, reference_samples: int = 10000,
                 reference: str | None = None, batch_size: int = 64, device: str = "auto") -> None:
        super().__init__(extractor, weights, reference_samples, reference, batch_size, device)

    def _reference_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._real and self._reference is not None and self._reference.features is None:
            assert self._reference.mu is not None and self._reference.sigma is not None
            return self._reference.mu, self._reference.sigma
        real = self._reference_features()
        if len(real) < 2:
            raise DataError(f"fid: needs at least 2 reference samples; got {len(real)}.")
        return feature_statistics(real)

    def compute(self) -> dict[str, float]:
        """``fid`` between the generated samples so far and the reference."""
        mu_r, sigma_r = self._reference_statistics()
        mu_g, sigma_g = feature_statistics(self._generated_features(2))
        return {"fid": frechet_distance(mu_g, sigma_g, mu_r, sigma_r)}

    def protocol(self) -> dict[str, Any]:
        """As for every feature metric, plus the formula."""
        return {**super().protocol(), "formula": "Fréchet distance of Gaussians (unbiased covariances, float64), "
                                                 "tr sqrt via eigenvalues of S1^1/2 S2 S1^1/2"}


@register("metric", "kid")
class KID(_ComparisonMetric):
    """Kernel Inception Distance: unbiased polynomial-kernel MMD² of features (Bińkowski et al., 2018).

    :func:`kernel_inception_distance` over ``subsets`` random subsets of ``subset_size`` samples of
    each set (capped at the smaller set; subsets drawn with a fixed seed, so the figure is
    reproducible); ``compute()`` gives ``kid`` (mean) and ``kid_std``. Unbiased, so it can be
    slightly negative and is comparable across sample counts. Arguments as for ``fid``, plus:

    Args:
        extractor: ``inception`` or ``classifier`` (or a FeatureExtractor object from Python).
        weights: the extractor's weight file (see ``fid``).
        reference_samples: real items whose features form the reference.
        reference: an .npz with precomputed reference ``features`` (N×D).
        batch_size: images per forward pass of the extractor.
        device: where the extractor runs.
        subsets: number of random subsets.
        subset_size: samples per subset and set.
        seed: seed of the subset draws.
    """

    name = "kid"

    def __init__(self, extractor: str = "inception", weights: str | None = None, reference_samples: int = 10000,
                 reference: str | None = None, batch_size: int = 64, device: str = "auto", subsets: int = 100,
                 subset_size: int = 1000, seed: int = 0) -> None:
        if not isinstance(subsets, int) or subsets < 1:
            raise ConfigError(f"kid: subsets must be a positive integer; got {subsets!r}.")
        if not isinstance(subset_size, int) or subset_size < 2:
            raise ConfigError(f"kid: subset_size must be an integer ≥ 2; got {subset_size!r}.")
        super().__init__(extractor, weights, reference_samples, reference, batch_size, device)
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed

    def compute(self) -> dict[str, float]:
        """``kid`` and ``kid_std`` over the subsets."""
        real = self._reference_features()
        mean, std = kernel_inception_distance(real, self._generated_features(2), self.subsets, self.subset_size,
                                              self.seed)
        return {"kid": mean, "kid_std": std}

    def _arguments(self) -> dict[str, Any]:
        return {**super()._arguments(), "subsets": self.subsets, "subset_size": self.subset_size, "seed": self.seed}

    def protocol(self) -> dict[str, Any]:
        """As for every feature metric, plus the kernel and the subset size used."""
        out = super().protocol()
        n_real = len(np.concatenate(self._real)) if self._real else (self._reference.num if self._reference else 0)
        used = min(self.subset_size, n_real, out["num_generated"])
        return {**out, "kernel": "(x·y/d + 1)^3", "estimator": "unbiased MMD²", "subset_size_used": used}


@register("metric", "inception_score")
class InceptionScore(_FeatureMetric):
    """Inception Score of generated images from the extractor's class logits (Salimans et al., 2016).

    exp(E KL(p(y|x) ‖ p(y))) on ``splits`` parts of the samples (at most one per sample; samples
    shuffled with torch-fidelity's seed first); ``compute()`` gives ``inception_score`` (mean over
    parts) and ``inception_score_std``. Higher is better, at most the number of classes. Needs no
    reference: ``real`` is ignored. With ``extractor=inception`` these are torch-fidelity's unbiased
    logits; with ``extractor=classifier``, a classifier-based score for in-domain data.

    Args:
        extractor: ``inception`` or ``classifier`` (or a FeatureExtractor object with logits).
        weights: the extractor's weight file (see ``fid``).
        batch_size: images per forward pass of the extractor.
        device: where the extractor runs.
        splits: number of parts the score is averaged over.
    """

    name = "inception_score"
    SHUFFLE_SEED: ClassVar[int] = 2020

    def __init__(self, extractor: str = "inception", weights: str | None = None, batch_size: int = 64,
                 device: str = "auto", splits: int = 10) -> None:
        if not isinstance(splits, int) or splits < 1:
            raise ConfigError(f"inception_score: splits must be a positive integer; got {splits!r}.")
        super().__init__(extractor, weights, batch_size, device)
        self.splits = splits

    def update(self, *, generated: Tensor, labels: Tensor | None = None, real: Tensor | None = None) -> None:
        """Add the class logits of ``generated``; ``real`` is ignored (the score needs no reference)."""
        x = check_images(generated, self.name)
        if len(x) == 0:
            return
        logits = self.extractor.logits(x)
        if logits is None:
            raise ConfigError(
                f"inception_score: the feature extractor {self.extractor.name!r} has no class logits; use "
                "extractor=inception or extractor=classifier."
            )
        self._generated.append(np.asarray(logits, dtype=np.float64))

    def compute(self) -> dict[str, float]:
        """``inception_score`` and ``inception_score_std`` over the parts."""
        mean, std = inception_score(self._generated_features(1), self.splits, self.SHUFFLE_SEED)
        return {"inception_score": mean, "inception_score_std": std}

    def _arguments(self) -> dict[str, Any]:
        return {**super()._arguments(), "splits": self.splits}

    def protocol(self) -> dict[str, Any]:
        """Metric, arguments, extractor and sample count; no reference."""
        out = super().protocol()
        return {**out, "splits_used": max(1, min(self.splits, out["num_generated"])),
                "shuffle": f"np.random.RandomState({self.SHUFFLE_SEED}).permutation (as torch-fidelity)"}


@register("metric", "precision_recall")
class PrecisionRecall(_ComparisonMetric):
    """Improved precision and recall of generated images (Kynkäänniemi et al., 2019).

    Precision: share of generated samples inside the real features' k-NN manifold (fidelity);
    recall: share of real samples inside the generated one (diversity); see
    :func:`precision_recall`. The paper uses as many generated as real samples; ``compute()`` gives
    ``precision`` and ``recall``. Arguments as for ``fid``, plus:

    Args:
        extractor: ``inception`` or ``classifier`` (or a FeatureExtractor object from Python).
        weights: the extractor's weight file (see ``fid``).
        reference_samples: real items whose features form the reference.
        reference: an .npz with precomputed reference ``features`` (N×D).
        batch_size: images per forward pass of the extractor.
        device: where the extractor and the distances run.
        k: the neighbour whose distance is a sample's radius.
    """

    name = "precision_recall"

    def __init__(self, extractor: str = "inception", weights: str | None = None, reference_samples: int = 10000,
                 reference: str | None = None, batch_size: int = 64, device: str = "auto", k: int = 3) -> None:
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"precision_recall: k must be a positive integer; got {k!r}.")
        super().__init__(extractor, weights, reference_samples, reference, batch_size, device)
        self.k = k
        self._radii: tuple[Reference, Tensor] | None = None  # k-NN radii of the reference, computed once

    def compute(self) -> dict[str, float]:
        """``precision`` and ``recall`` against the reference."""
        real = self._reference_features()
        fake = self._generated_features(self.k + 1)
        r = _float64(real, self.device)
        radii = None
        if not self._real and self._radii is not None and self._radii[0] is self._reference:
            radii = self._radii[1]
        elif not self._real and self._reference is not None and len(r) > self.k:
            radii = knn_radii(r, self.k)
            self._radii = (self._reference, radii)
        precision, recall = precision_recall(r, fake, self.k, device=self.device, real_radii=radii)
        return {"precision": precision, "recall": recall}

    def set_reference(self, dataset: Any, dataset_config: Mapping[str, Any]) -> None:
        """As for every feature metric; forgets cached reference radii."""
        self._radii = None
        super().set_reference(dataset, dataset_config)

    def _arguments(self) -> dict[str, Any]:
        return {**super()._arguments(), "k": self.k}
