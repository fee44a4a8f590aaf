"""Feature extractors for distribution metrics (FID, KID, precision/recall, Inception Score).

A feature extractor maps N×C×H×W images in [-1, 1] to N×D features (float64, CPU) and,
when it has a classification head, to N×K class logits. :func:`extractor_from` turns a
metric's ``extractor``/``weights`` arguments into one:

- ``"inception"``: the Inception-v3 network of FID (TensorFlow's "2015-12-05" graph, as
  ported by torch-fidelity), 2048-d pool features and 1008 unbiased logits. Its weights are
  never downloaded: they are read from ``weights`` or from the torch hub cache where
  torch-fidelity and torchmetrics keep them (:func:`inception_cache_path`).
- ``"classifier"``: a classifier trained by ``unfog train-classifier`` (its penultimate
  features and its logits).
- any object with the :class:`FeatureExtractor` attributes, used as is; :func:`module_extractor`
  wraps a plain ``nn.Module``.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from unfog.errors import ConfigError, DataError
from unfog.util import resolve_device, sha256_of

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_FEATURES = "2048"
INCEPTION_LOGITS = "logits_unbiased"
EXTRACTORS = ("inception", "classifier")


@runtime_checkable
class FeatureExtractor(Protocol):
    """Images → features (and class logits when the network has a classification head)."""

    name: str
    weights_sha256: str

    def features(self, images: Tensor) -> Tensor:
        """N×C×H×W images in [-1, 1] → (N, D) float64 features on the CPU."""
        ...

    def logits(self, images: Tensor) -> Tensor | None:
        """N×C×H×W images in [-1, 1] → (N, K) class logits, or None without a classification head."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able: name, weights path, weights sha256, feature dimension, input preprocessing."""
        ...


def extractor_from(extractor: str | FeatureExtractor, weights: str | None = None, device: str = "auto",
                   batch_size: int = 64) -> FeatureExtractor:
    """The feature extractor a metric's ``extractor`` and ``weights`` arguments name.

    Args:
        extractor: ``"inception"``, ``"classifier"``, or a :class:`FeatureExtractor` object (used as is).
        weights: for ``"inception"``, the torch-fidelity weight file (or the folder holding it);
            None looks in the torch hub cache. For ``"classifier"``, the folder written by
            ``unfog train-classifier`` or its ``.safetensors`` file (required).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        batch_size: images per forward pass.
    """
    if not isinstance(extractor, str):
        if not isinstance(extractor, FeatureExtractor):
            raise ConfigError(
                f"extractor must be one of {', '.join(map(repr, EXTRACTORS))} or an object with name, "
                f"weights_sha256, features(), logits() and describe(); got {type(extractor).__name__}. "
                "Wrap an nn.Module with unfog_metrics.features.module_extractor(module, name)."
            )
        if weights is not None:
            raise ConfigError(
                f"weights={weights!r} was given with a feature-extractor object ({extractor.name!r}), which "
                "brings its own weights; leave weights unset."
            )
        return extractor
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer; got {batch_size!r}.")
    if extractor == "inception":
        return InceptionExtractor(weights, device=device, batch_size=batch_size)
    if extractor == "classifier":
        if not weights:
            raise ConfigError(
                "extractor='classifier' needs weights=PATH: the folder written by `unfog train-classifier` "
                "(or its .safetensors file). Train one with `unfog train-classifier dataset=NAME`, then pass "
                "e.g. extractor_weights=PATH (unfog evaluate), evaluation.extractor_weights=PATH (unfog train) "
                "or metrics.NAME.weights=PATH for one metric."
            )
        try:
            from unfog_metrics.classifier import ClassifierExtractor
        except ImportError as exc:  # pragma: no cover - shipped with unfog_metrics
            raise ConfigError(f"extractor='classifier' is unavailable: {exc}.") from exc
        return ClassifierExtractor(weights, device=device, batch_size=batch_size)
    raise ConfigError(
        f"Unknown feature extractor {extractor!r}; expected one of {', '.join(map(repr, EXTRACTORS))}."
    )


def check_images(images: Any, who: str) -> Tensor:
    """``images`` as an N×C×H×W float tensor, or a DataError that says what the metric needs."""
    x = torch.as_tensor(images).detach()
    if x.ndim == 2:
        raise DataError(
            f"{who}: needs images (N×C×H×W) but got points of shape {tuple(x.shape)}. For point data such as "
            "toy2d use metric=sliced_wasserstein or metric=mmd, which compare the points themselves."
        )
    if x.ndim != 4:
        raise DataError(
            f"{who}: needs images shaped N×C×H×W (C 1 or 3) in [-1, 1]; got shape {tuple(x.shape)}. "
            "Feature-based metrics work on image datasets only."
        )
    if not x.is_floating_point():
        raise DataError(f"{who}: images must be floating point in [-1, 1]; got dtype {x.dtype}.")
    return x


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (cached by path, size and modification time)."""
    p = Path(path).resolve()
    st = p.stat()
    return _file_sha256(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_of(path)


def state_dict_sha256(*modules: nn.Module | None) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the modules' state dicts."""
    digest = hashlib.sha256()
    for i, module in enumerate(modules):
        if module is None:
            continue
        for key, value in sorted(module.state_dict().items()):
            t = value.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{i}:{key}:{t.dtype}:{tuple(value.shape)};".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _batched(fn: Any, images: Tensor, batch_size: int) -> Tensor:
    outs = [fn(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    if not outs:
        return torch.empty(0, 0, dtype=torch.float64)
    return torch.cat([o.detach().to("cpu", torch.float64).reshape(len(o), -1) for o in outs])


class ModuleExtractor:
    """An ``nn.Module`` (images → features) used as a :class:`FeatureExtractor`; images reach it unchanged."""

    def __init__(self, module: nn.Module, name: str, logits_module: nn.Module | None = None,
                 batch_size: int = 64) -> None:
        self.module = module.eval()
        self.logits_module = logits_module.eval() if logits_module is not None else None
        self.name = name
        self.batch_size = batch_size
        self.weights_sha256 = state_dict_sha256(module, logits_module)
        self._dim: int | None = None

    def _device(self, module: nn.Module) -> torch.device:
        p = next(module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Features of ``images`` (passed to the module unchanged) as (N, D) float64 on the CPU."""
        device = self._device(self.module)
        out = _batched(lambda b: self.module(b.to(device)), images, self.batch_size)
        self._dim = out.shape[1] if len(out) else self._dim
        return out

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor | None:
        """``logits_module(images)`` as (N, K) float64 on the CPU; None without one."""
        if self.logits_module is None:
            return None
        device = self._device(self.logits_module)
        return _batched(lambda b: self.logits_module(b.to(device)), images, self.batch_size)

    def describe(self) -> dict[str, Any]:
        """Name, weights sha256 (of the state dict), feature dimension (once known), preprocessing."""
        return {"name": self.name, "weights": None, "weights_sha256": self.weights_sha256,
                "weights_source": "in-memory nn.Module (sha256 of its state dict)",
                "feature_dim": self._dim, "preprocessing": "none: images passed unchanged"}

    def __repr__(self) -> str:
        return f"ModuleExtractor(name={self.name!r}, weights_sha256={self.weights_sha256[:12]}…)"


def module_extractor(module: nn.Module, name: str, logits_module: nn.Module | None = None,
                     batch_size: int = 64) -> ModuleExtractor:
    """Wrap ``module`` (images → features) and optionally ``logits_module`` (images → logits) as a
    :class:`FeatureExtractor` whose ``weights_sha256`` is a hash of their state dicts."""
    return ModuleExtractor(module, name, logits_module, batch_size=batch_size)


# --- Inception-v3 through torch-fidelity -------------------------------------------------------


def inception_cache_path() -> Path:
    """Where torch-fidelity (and torchmetrics through it) caches the FID Inception weights:
    ``torch.hub.get_dir()/checkpoints/`` (``$TORCH_HOME/hub`` or ``~/.cache/torch/hub``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def find_inception_weights(weights: str | None) -> Path:
    """The Inception weight file: ``weights`` (a file, or a folder holding it), else the torch hub
    cache; otherwise a ConfigError saying where to get it. Never downloads."""
    if weights:
        p = Path(weights).expanduser()
        if p.is_dir():
            p = p / INCEPTION_FILE
        if p.is_file():
            return p
        raise ConfigError(
            f"Inception weights not found at {p}. Download {INCEPTION_URL} on a machine with network access "
            f"and pass its path (e.g. extractor_weights=/path/to/{INCEPTION_FILE})."
        )
    cached = inception_cache_path()
    if cached.is_file():
        return cached
    raise ConfigError(
        "extractor='inception' needs torch-fidelity's Inception-v3 weights (FID's 2015-12-05 network), which "
        f"cannot be downloaded here. Get {INCEPTION_URL} (about 95 MB) on a machine with network access, then "
        f"either put it at {cached} or pass its path: extractor_weights=/path/to/{INCEPTION_FILE} (unfog "
        "evaluate), evaluation.extractor_weights=... (unfog train), metrics.NAME.weights=... (one metric) or "
        "weights=... in Python."
    )


def _import_inception() -> type:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as exc:
        raise ConfigError(
            f"extractor='inception' needs torch-fidelity ({exc}); run `pip install 'unfog[eval]'` "
            "(or `pip install torch-fidelity`)."
        ) from exc
    return FeatureExtractorInceptionV3


@functools.lru_cache(maxsize=2)
def _inception_network(path: str, sha256: str, device: str) -> nn.Module:
    cls = _import_inception()
    try:  # refuse anything but tensors before torch-fidelity unpickles the file without weights_only
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"{path} is not a loadable PyTorch state dict of tensors ({type(exc).__name__}: {exc}). "
            f"Expected torch-fidelity's {INCEPTION_FILE} from {INCEPTION_URL}."
        ) from exc
    try:
        net = cls(INCEPTION_NAME, [INCEPTION_FEATURES, INCEPTION_LOGITS], feature_extractor_weights_path=path)
    except RuntimeError as exc:  # a state dict of another network
        raise ConfigError(
            f"{path} does not hold torch-fidelity's Inception-v3 weights ({str(exc).splitlines()[0]}). "
            f"Expected {INCEPTION_FILE} from {INCEPTION_URL}."
        ) from exc
    return net.to(device)


def inception_preprocess(images: Tensor) -> Tensor:
    """[-1, 1] floats → uint8 0..255 RGB (rounded; grey repeated; non-finite values → 0 first)."""
    x = torch.nan_to_num(images.float(), nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1.0, 1.0)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


class InceptionExtractor:
    """FID's Inception-v3 (torch-fidelity's ``FeatureExtractorInceptionV3``): 2048-d pool3 features
    and 1008 ``logits_unbiased`` (the fc layer without its bias, as torch-fidelity's Inception Score).

    Images in [-1, 1] become uint8 RGB as in the reference implementations; torch-fidelity resizes them
    to 299×299 with TensorFlow-1-compatible bilinear interpolation. The network is built once per
    weight file and device and shared.
    """

    def __init__(self, weights: str | None = None, device: str = "auto", batch_size: int = 64) -> None:
        self.name = INCEPTION_NAME
        self.path = find_inception_weights(weights)
        self.weights_sha256 = file_sha256(self.path)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.network = _inception_network(str(self.path.resolve()), self.weights_sha256, str(self.device))

    @torch.no_grad()
    def _forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = check_images(images, self.name)
        if x.shape[1] not in (1, 3):
            raise DataError(
                f"{self.name}: takes greyscale or RGB images (C = 1 or 3); got {x.shape[1]} channels."
            )
        feats, logits = [], []
        for i in range(0, len(x), self.batch_size):
            f, lg = self.network(inception_preprocess(x[i:i + self.batch_size]).to(self.device))
            feats.append(f.to("cpu", torch.float64))
            logits.append(lg.to("cpu", torch.float64))
        if not feats:
            return torch.empty(0, 2048, dtype=torch.float64), torch.empty(0, 1008, dtype=torch.float64)
        return torch.cat(feats), torch.cat(logits)

    def features(self, images: Tensor) -> Tensor:
        """(N, 2048) pool3 features, float64 on the CPU."""
        return self._forward(images)[0]

    def logits(self, images: Tensor) -> Tensor:
        """(N, 1008) unbiased logits (fc without bias), float64 on the CPU."""
        return self._forward(images)[1]

    def describe(self) -> dict[str, Any]:
        """Name, weight file and its sha256, dimensions, preprocessing and torch-fidelity's version."""
        from torch_fidelity.version import __version__ as fidelity_version

        return {
            "name": self.name, "weights": str(self.path), "weights_sha256": self.weights_sha256,
            "weights_url": INCEPTION_URL, "feature_dim": 2048, "feature_layer": INCEPTION_FEATURES,
            "logits_dim": 1008, "logits_layer": INCEPTION_LOGITS,
            "preprocessing": "[-1, 1] → uint8 round((x + 1)·127.5), non-finite → 0 first, grey repeated to RGB; "
                             "resized to 299×299 by torch-fidelity's TF1-compatible bilinear interpolation",
            "implementation": f"torch-fidelity {fidelity_version} FeatureExtractorInceptionV3",
        }

    def __repr__(self) -> str:
        return f"InceptionExtractor(weights={str(self.path)!r}, device={str(self.device)!r})"
