"""Reference features of real data, computed once per dataset and feature extractor and cached.

Files live under ``cache_root()/reference/KEY.npz`` (features, float32) with ``KEY.json`` beside it
(what they were computed from). ``KEY`` hashes everything that determines the features: the
dataset's config, the number of items and the seed that chose them, the extractor's name and
its weights' sha256, and the file format version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unfog.errors import DataError
from unfog_metrics.features import FeatureExtractor, file_sha256

FORMAT_VERSION = 1


def cache_root() -> Path:
    """``$UNFOG_CACHE`` if set, else ``~/.cache/unfog``; reference features go under ``reference/``."""
    env = os.environ.get("UNFOG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unfog"


@dataclasses.dataclass
class Reference:
    """Real-data features (or, from a user file, only their mean and covariance) and where they came from."""

    features: np.ndarray | None
    source: str
    key: str
    path: Path | None
    sha256: str
    num: int
    cached: bool
    dataset_config: dict[str, Any] | None = None
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-able: source, dataset config, number of items, cache key, file and its sha256."""
        out: dict[str, Any] = {"source": self.source, "num": self.num, "sha256": self.sha256,
                               "path": str(self.path) if self.path else None}
        if self.source == "dataset":
            out.update(dataset_config=self.dataset_config, key=self.key, cached=self.cached)
        if self.features is None:
            out["statistics_only"] = True
        return out


def reference_key(extractor: FeatureExtractor, dataset_config: Mapping[str, Any], num: int, seed: int) -> str:
    """sha256 of the canonical JSON of everything that determines the reference features."""
    spec = {"format": FORMAT_VERSION, "dataset_config": dict(dataset_config), "num": int(num), "seed": int(seed),
            "extractor": extractor.name, "extractor_weights_sha256": extractor.weights_sha256}
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def reference_features(extractor: FeatureExtractor, dataset: Any, dataset_config: Mapping[str, Any], num: int, *,
                       seed: int = 0, batch_size: int = 256) -> Reference:
    """Features of ``num`` items of ``dataset`` (all if it is smaller; else a random subset fixed by
    ``seed``), loaded from the cache when they were computed before, else computed and saved."""
    if num < 1:
        raise DataError(f"reference: need at least one reference sample; got num={num}.")
    config = _plain(dataset_config)
    key = reference_key(extractor, config, num, seed)
    folder = cache_root() / "reference"
    path = folder / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as data:
                features = np.asarray(data["features"], dtype=np.float32)
            return Reference(features, "dataset", key, path, file_sha256(path), len(features), True, config)
        except Exception as exc:  # a damaged file: compute again and replace it
            warnings.warn(f"reference: could not read {path} ({exc}); computing the features again.", stacklevel=2)
    indices = _indices(len(dataset), num, seed)
    features = _compute(extractor, dataset, indices, batch_size)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: np.savez(f, features=features, indices=indices))
    sha = file_sha256(path)
    meta = {"key": key, "format": FORMAT_VERSION, "dataset_config": config, "num_requested": int(num),
            "num": len(features), "seed": seed, "extractor": extractor.describe(), "sha256": sha,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=2, default=str).encode()))
    return Reference(features, "dataset", key, path, sha, len(features), False, config)


def load_reference_file(path: str | os.PathLike[str]) -> Reference:
    """A user-supplied ``.npz`` with ``features`` (N×D), or ``mu`` and ``sigma`` (their mean and
    covariance, enough for FID only, as in pytorch-fid's statistics files)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"reference file {p} does not exist; give an .npz with 'features' (N×D) or 'mu' and 'sigma'.")
    try:
        with np.load(p) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except Exception as exc:
        raise DataError(f"reference file {p} is not a readable .npz ({exc}).") from exc
    sha = file_sha256(p)
    if "features" in arrays:
        features = arrays["features"].astype(np.float32)
        if features.ndim != 2 or len(features) < 2:
            raise DataError(f"reference file {p}: 'features' must be N×D with N ≥ 2; got shape {features.shape}.")
        return Reference(features, str(p), "", p, sha, len(features), True)
    if "mu" in arrays and "sigma" in arrays:
        mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise DataError(f"reference file {p}: need mu (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}.")
        num = int(arrays["num"]) if "num" in arrays else 0
        return Reference(None, str(p), "", p, sha, num, True, mu=mu, sigma=sigma)
    raise DataError(
        f"reference file {p} holds {sorted(arrays)}; expected 'features' (N×D), or 'mu' and 'sigma' (FID only)."
    )


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON round trip of ``config`` (OmegaConf nodes, tuples, paths → plain JSON values)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)  # type: ignore[assignment]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return json.loads(json.dumps(dict(config), sort_keys=True, default=str))


def _indices(size: int, num: int, seed: int) -> np.ndarray:
    if size < 1:
        raise DataError("reference: the dataset is empty; it has no items to take reference features from.")
    if num >= size:
        return np.arange(size)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:num]
    return np.sort(order.numpy())


def _compute(extractor: FeatureExtractor, dataset: Any, indices: np.ndarray, batch_size: int) -> np.ndarray:
    chunks = []
    for start in range(0, len(indices), batch_size):
        items = [dataset[int(i)] for i in indices[start:start + batch_size]]
        try:
            x = torch.stack([torch.as_tensor(item["x"]) for item in items])
        except (KeyError, TypeError) as exc:
            raise DataError(f"reference: dataset items must be dicts with a tensor field 'x' ({exc}).") from exc
        chunks.append(extractor.features(x).numpy().astype(np.float32))
    return np.concatenate(chunks)


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
