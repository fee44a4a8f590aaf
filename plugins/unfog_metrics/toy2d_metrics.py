"""Exact distances for 2-D points: sliced Wasserstein-2 and RBF MMD² against fresh samples of
the true distribution.

The functions :func:`sliced_w2` and :func:`mmd2` are the one implementation shared by the
``sliced_wasserstein`` and ``mmd`` metrics and by ``benchmarks/samplers.py``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from unfog import register
from unfog.errors import ConfigError, DataError

REFERENCE_SEED_OFFSET = 1_000_003  # fresh reference points: the dataset's seed + this


# ---------------------------------------------------------------------------- distances


def sliced_w2(x: Tensor, y: Tensor, projections: int = 512, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two point sets (rows; any shape after the first axis).

    √(mean over ``projections`` random unit directions θ of W2²(θ·x, θ·y)) (Rabin et al. 2011;
    Bonneel et al. 2015, Sec. 2.2). Each 1-D W2² is exact: for sets of equal size the mean
    squared difference of the sorted projections; otherwise the integral over u ∈ [0, 1] of
    the squared difference of the two empirical quantile functions. The directions depend
    only on ``seed`` and the dimension.
    """
    x, y = _flat(x), _flat(y)
    if x.shape[1] != y.shape[1] or len(x) == 0 or len(y) == 0:
        raise DataError(
            f"sliced_w2 needs two non-empty sets of points of the same dimension; got {tuple(x.shape)} "
            f"and {tuple(y.shape)}."
        )
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px = (theta.T @ x.T).sort(dim=1).values  # projections × points; sorting rows is the fast direction
    py = (theta.T @ y.T).sort(dim=1).values
    return float(_w2_squared_sorted(px, py).mean().sqrt())


def _w2_squared_sorted(px: Tensor, py: Tensor) -> Tensor:
    """W2² between the 1-D empirical distributions of each row of two sorted matrices."""
    n, m = px.shape[1], py.shape[1]
    if n == m:
        return ((px - py) ** 2).mean(dim=1)
    # The quantile functions are step functions with steps at k/n and k/m: integrate piece by piece.
    ends = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                      torch.arange(1, m + 1, dtype=torch.float64) / m]).unique(sorted=True)
    widths = torch.diff(ends, prepend=ends.new_zeros(1))
    mids = ends - widths / 2
    i = (mids * n).long().clamp_(max=n - 1)
    j = (mids * m).long().clamp_(max=m - 1)
    return torch.cat([((a[:, i] - b[:, j]) ** 2 * widths).sum(dim=1)
                      for a, b in zip(px.split(_ROWS), py.split(_ROWS))])


_ROWS = 64  # projections per block of the unequal-size integral (bounds the memory it takes)


def median_distance(x: Tensor, max_points: int = 2000) -> float:
    """The median pairwise Euclidean distance within ``x`` (on at most ``max_points`` rows)."""
    x = _flat(x)[:max_points]
    d = torch.cdist(x, x)
    return float(d[torch.triu_indices(len(x), len(x), 1).unbind()].median())


def mmd2(x: Tensor, y: Tensor, bandwidths: Sequence[float]) -> float:
    """Unbiased squared MMD (Gretton et al. 2012, Eq. 3) with the mean of RBF kernels
    k(a, b) = exp(−|a − b|² / (2h²)) over the ``bandwidths`` h."""
    x, y = _flat(x), _flat(y)
    if x.shape[1] != y.shape[1] or len(x) < 2 or len(y) < 2:
        raise DataError(
            f"mmd2 needs two sets of at least 2 points of the same dimension; got {tuple(x.shape)} and "
            f"{tuple(y.shape)}."
        )
    return _mmd2_terms(x, bandwidths) - 2 * _kernel_mean(x, y, bandwidths) + _mmd2_terms(y, bandwidths)


def _mmd2_terms(x: Tensor, bandwidths: Sequence[float]) -> float:
    """Mean of k(x_i, x_j) over i ≠ j."""
    n = len(x)
    total = _kernel_mean(x, x, bandwidths) * n * n
    return (total - n) / (n * (n - 1))  # the diagonal is k = 1 for every bandwidth


def _kernel_mean(x: Tensor, y: Tensor, bandwidths: Sequence[float], block: int = 2048) -> float:
    total = 0.0
    for start in range(0, len(x), block):
        d2 = torch.cdist(x[start : start + block], y).square_()
        total += sum(float(torch.exp(-d2 / (2 * h * h)).sum()) for h in bandwidths) / len(bandwidths)
    return total / (len(x) * len(y))


def _flat(x: Tensor) -> Tensor:
    return torch.as_tensor(x).reshape(len(x), -1).to(torch.float64)


# ---------------------------------------------------------------------------- metrics


class _PointMetric:
    """Shared parts: the reference (fresh true samples, or ``real`` from update) and the samples."""

    key = ""

    def __init__(self, reference_samples: int) -> None:
        if isinstance(reference_samples, bool) or not isinstance(reference_samples, int) or reference_samples < 2:
            raise ConfigError(
                f"{self.key}: reference_samples must be an integer of at least 2; got {reference_samples!r}."
            )
        self.reference_samples = reference_samples
        self._reference: Tensor | None = None
        self._reference_record: dict[str, Any] | None = None
        self._generated: list[Tensor] = []
        self._real: list[Tensor] = []

    def set_reference(self, dataset: Any, dataset_config: Mapping[str, Any]) -> None:
        """Take the reference from the training data's distribution.

        For ``toy2d``: ``reference_samples`` fresh points of the same distribution, drawn with
        the dataset's seed + 1,000,003, so the reference shares no point with the training
        set. Any other dataset of points: its first ``reference_samples`` items. Images are
        refused.
        """
        import unfog

        self._check_points(tuple(getattr(dataset, "data_shape", ())), "the dataset's items")
        config = {k: v for k, v in dict(dataset_config).items() if k != "_name_"}
        if dataset_config.get("_name_") == "toy2d":
            seed = int(config.get("seed", 0)) + REFERENCE_SEED_OFFSET
            fresh = {**config, "seed": seed, "size": self.reference_samples}
            points = unfog.create("dataset", "toy2d", **fresh).points
            record = {"source": "dataset", "fresh": True, "distribution": getattr(dataset, "name", config.get("name")),
                      "dataset_config": {"_name_": "toy2d", **fresh}, "seed": seed}
        else:
            n = min(self.reference_samples, len(dataset))
            points = torch.stack([torch.as_tensor(dataset[i]["x"]) for i in range(n)])
            record = {"source": "dataset", "fresh": False, "dataset_config": dict(dataset_config),
                      "note": "the dataset's own first items: fresh points are drawn for toy2d only"}
        self._reference = _flat(points)
        self._reference_record = {**record, "num": len(self._reference), "sha256": _sha256(self._reference)}

    def update(self, *, generated: Tensor, labels: Tensor | None = None, real: Tensor | None = None) -> None:
        """Add generated points (N×D); ``real`` points, when given, are the reference until reset()."""
        x = torch.as_tensor(generated).detach().cpu()
        self._check_points(tuple(x.shape[1:]), "generated samples")
        self._generated.append(_flat(x))
        if real is not None:
            r = torch.as_tensor(real).detach().cpu()
            self._check_points(tuple(r.shape[1:]), "real samples")
            self._real.append(_flat(r))

    def reset(self) -> None:
        """Forget the generated (and ``real``) points; a reference from set_reference() stays."""
        self._generated.clear()
        self._real.clear()

    def compute(self) -> dict[str, float]:
        """The distance of every generated point since reset() to the reference, and ``n``."""
        if not self._generated or sum(len(g) for g in self._generated) == 0:
            raise DataError(f"{self.key}: no samples to score; call update(generated=...) first.")
        x = torch.cat(self._generated)
        y = self._current_reference()
        if x.shape[1] != y.shape[1]:
            raise DataError(
                f"{self.key}: generated points have {x.shape[1]} coordinates but the reference has {y.shape[1]}."
            )
        value = self._distance(x, y) if bool(torch.isfinite(x).all()) else math.inf
        return {self.value_key: value, "n": float(len(x))}

    def protocol(self) -> dict[str, Any]:
        """The metric's arguments and where its reference came from (with the points' sha256)."""
        if self._real:
            y = torch.cat(self._real)
            reference: dict[str, Any] | None = {"source": "real", "num": len(y), "sha256": _sha256(y)}
        else:
            reference = self._reference_record
        return {"metric": self.key, "arguments": self._arguments(), "extractor": None, "reference": reference}

    def _current_reference(self) -> Tensor:
        if self._real:
            return torch.cat(self._real)
        if self._reference is None:
            raise DataError(
                f"{self.key}: no reference points; call set_reference(dataset, dataset_config) (unfog evaluate "
                "and the training callback do) or pass real= to update()."
            )
        return self._reference

    def _check_points(self, shape: tuple[int, ...], what: str) -> None:
        if len(shape) != 1:
            raise DataError(
                f"{self.key}: {what} must be points N×D (e.g. toy2d's N×2); got items of shape {shape}. "
                "For images use fid or kid (or class_accuracy with a classifier from `unfog train-classifier`)."
            )

    value_key = ""

    def _distance(self, x: Tensor, y: Tensor) -> float:
        raise NotImplementedError

    def _arguments(self) -> dict[str, Any]:
        raise NotImplementedError


def _sha256(x: Tensor) -> str:
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()


@register("metric", "sliced_wasserstein")
class SlicedWasserstein(_PointMetric):
    """Sliced Wasserstein-2 distance of generated points to fresh samples of the true distribution.

    √(mean over ``projections`` random unit directions θ of the exact 1-D W2² between the
    projected sets) (Rabin et al. 2011; Bonneel et al. 2015). The reference is
    ``reference_samples`` new points of the training distribution (``set_reference``: toy2d
    with another seed), or the ``real`` points passed to ``update``. ``compute()`` gives
    ``sw2`` (in the data's units; infinite if any sample is not finite) and ``n``.

    Args:
        projections: number of random directions.
        reference_samples: number of fresh reference points.
        seed: seed of the directions.
    """

    key = "sliced_wasserstein"
    value_key = "sw2"

    def __init__(self, projections: int = 512, reference_samples: int = 10000, seed: int = 0) -> None:
        super().__init__(reference_samples)
        for name, value, minimum in (("projections", projections, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(
                    f"sliced_wasserstein: {name} must be an integer of at least {minimum}; got {value!r}."
                )
        self.projections, self.seed = projections, seed

    def _distance(self, x: Tensor, y: Tensor) -> float:
        return sliced_w2(x, y, self.projections, self.seed)

    def _arguments(self) -> dict[str, Any]:
        return {"projections": self.projections, "reference_samples": self.reference_samples, "seed": self.seed}


@register("metric", "mmd")
class MMD(_PointMetric):
    """Unbiased squared maximum mean discrepancy of generated points to fresh true samples.

    MMD² (Gretton et al. 2012, Eq. 3) with the mean of RBF kernels exp(−|a − b|² / (2h²)) over
    several bandwidths h. With ``median_scaled`` (the default) the ``bandwidths`` are multiples
    of the median pairwise distance of the reference points (the median heuristic, Gretton et
    al. 2012, Sec. 8), otherwise absolute. The reference is as for ``sliced_wasserstein``.
    ``compute()`` gives ``mmd2`` (≈ 0 for samples of the true distribution, and may be slightly
    negative; infinite if any sample is not finite) and ``n``.

    Args:
        bandwidths: kernel bandwidths (multiples of the median distance, or absolute).
        median_scaled: whether ``bandwidths`` are multiples of the reference's median distance.
        reference_samples: number of fresh reference points.
    """

    key = "mmd"
    value_key = "mmd2"

    def __init__(self, bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0), median_scaled: bool = True,
                 reference_samples: int = 10000) -> None:
        super().__init__(reference_samples)
        values = tuple(bandwidths)
        if not values or any(isinstance(h, bool) or not isinstance(h, (int, float)) or not h > 0 for h in values):
            raise ConfigError(f"mmd: bandwidths must be positive numbers, e.g. [0.5,1.0,2.0]; got {bandwidths!r}.")
        self.bandwidths = tuple(float(h) for h in values)
        self.median_scaled = bool(median_scaled)

    def kernel_bandwidths(self, reference: Tensor) -> tuple[float, ...]:
        """The absolute bandwidths used against ``reference``."""
        scale = median_distance(reference) if self.median_scaled else 1.0
        return tuple(h * scale for h in self.bandwidths)

    def _distance(self, x: Tensor, y: Tensor) -> float:
        if len(x) < 2:
            raise DataError(f"mmd: needs at least 2 generated points; got {len(x)}.")
        return mmd2(x, y, self.kernel_bandwidths(y))

    def _arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {"bandwidths": list(self.bandwidths), "median_scaled": self.median_scaled,
                                     "reference_samples": self.reference_samples}
        if self._real or self._reference is not None:
            arguments["kernel_bandwidths"] = list(self.kernel_bandwidths(self._current_reference()))
        return arguments
