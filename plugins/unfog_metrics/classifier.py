"""An in-domain image classifier trained by unfog: class accuracy of generated samples, and the
feature extractor behind classifier-based Fréchet distance and Inception Score.

``unfog train-classifier dataset=NAME`` runs :func:`train_classifier`, which trains a small CNN
on a labelled image dataset and writes ``classifier.safetensors`` with ``classifier.json``
beside it (architecture, classes, data shape and range, held-out accuracy, hashes).
:class:`ClassifierExtractor` loads that folder as a feature extractor (penultimate features and
class logits); the ``class_accuracy`` metric and ``fid``/``inception_score`` with
``extractor=classifier weights=FOLDER`` use it. Where no Inception-v3 weights can be had, these
in-domain features play the role Inception features play in FID (Heusel et al. 2017) and the
Inception Score (Salimans et al. 2016): the same formulas on a network that knows this data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unfog import register
from unfog.errors import ConfigError, DataError
from unfog.util import resolve_device, sha256_of, versions
from unfog_metrics._common import requested_labels

WEIGHTS_FILE = "classifier.safetensors"
RECORD_FILE = "classifier.json"
FORMAT = "unfog-classifier"
FORMAT_VERSION = 1
HELD_OUT_SEED_OFFSET = 1_000_003  # procedural datasets: the held-out set is drawn with seed + this
HELD_OUT_FRACTION = 0.1  # datasets without a split or a seed: the last 10 % of indices are held out
MAX_PRELOAD_BYTES = 4 << 30  # the training images are held in memory as float32
COMMAND = "unfog train-classifier dataset=NAME"


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class ImageClassifier(nn.Module):
    """A small CNN for C×H×W images (8×8 and up): three conv stages of ``width``, 2·``width``
    and 4·``width`` channels (GroupNorm, SiLU; stages 2 and 3 halve the resolution with a
    stride-2 convolution), global average pooling, a ``feature_dim`` penultimate layer and a
    linear map to the classes.

    Args:
        in_channels: image channels (1 or 3).
        num_classes: number of classes.
        width: channels of the first stage.
        feature_dim: size of the penultimate feature vector.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        stages, channels = [], in_channels
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(
                nn.Conv2d(channels, w, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(_groups(w), w), nn.SiLU(),
                nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(_groups(w), w), nn.SiLU(),
            ))
            channels = w
        self.stages = nn.Sequential(*stages)
        self.embed = nn.Sequential(nn.Linear(channels, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """The penultimate features (N × feature_dim) of images N×C×H×W."""
        return self.embed(self.stages(x).mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (N × num_classes)."""
        return self.head(self.features(x))


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The settings of ``unfog train-classifier`` (conf/train_classifier.yaml) besides ``dataset``."""

    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    device: str = "auto"
    width: int = 32
    feature_dim: int = 128
    shift: int = 1  # random-shift augmentation by up to this many pixels (0: none)
    eval_samples: int = 5000  # held-out items scored (at most)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> TrainSettings:
        """The settings of a config, checked: unknown keys and wrong types are refused."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - set(fields) - {"dataset", "output_dir"})
        if unknown:
            raise ConfigError(
                f"train-classifier: unknown setting(s) {', '.join(unknown)}; the settings are "
                f"dataset, output_dir, {', '.join(fields)}."
            )
        values = {k: cfg[k] for k in fields if k in cfg and cfg[k] is not None}
        settings = cls(**values)
        for name in ("steps", "batch_size", "width", "feature_dim", "eval_samples"):
            _check_int(name, getattr(settings, name), 1)
        for name in ("seed", "shift"):
            _check_int(name, getattr(settings, name), 0)
        for name in ("lr", "weight_decay"):
            value = getattr(settings, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"train-classifier: {name} must be a non-negative number; got {value!r}.")
        if settings.lr == 0:
            raise ConfigError("train-classifier: lr must be positive; got 0.")
        return settings


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"train-classifier: {name} must be an integer of at least {minimum}; got {value!r}.")


def check_labelled_images(name: str, dataset: Any) -> None:
    """Refuse a dataset that is not labelled C×H×W images, saying what to use instead."""
    shape = tuple(getattr(dataset, "data_shape", ()))
    if len(shape) == 1:
        raise ConfigError(
            f"train-classifier: dataset {name!r} holds points of shape {shape}, not images; a classifier "
            "needs labelled images. For 2-D points use the metrics sliced_wasserstein and mmd, which "
            "compare samples with fresh points of the true distribution."
        )
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape[1:]) < 8:
        raise ConfigError(
            f"train-classifier: dataset {name!r} gives data of shape {shape}; the classifier takes images "
            "C×H×W with C 1 or 3 and sides of at least 8 (digits, shapes, image_folder, cifar10, mnist)."
        )
    fields = getattr(dataset, "fields", ())
    if "label" not in fields or not getattr(dataset, "num_classes", None):
        raise ConfigError(
            f"train-classifier: dataset {name!r} has no class labels (fields {', '.join(fields)}); the "
            "classifier learns the field 'label'. Choose a labelled dataset such as dataset=digits or "
            "dataset=shapes."
        )


def held_out_split(node: Mapping[str, Any], dataset: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The training data, the held-out data and how the latter was made.

    A dataset with a ``split`` parameter offering ``"test"`` is held out by that split; a
    procedural one with a ``seed`` (shapes) by the same config with seed + 1,000,003; any
    other by its last 10 % of indices (trained on the first 90 %).
    """
    from torch.utils.data import Subset

    from unfog import registry
    from unfog.config import NAME_KEY, build, params_of

    name = node[NAME_KEY]
    params = {p.name: p for p in params_of(registry.get("dataset", name).obj)}
    split = params.get("split")
    if split is not None and split.choices and "test" in split.choices:
        chosen = node.get("split", split.default)
        if chosen != "train":
            raise ConfigError(
                f"train-classifier: dataset {name!r} with split={chosen!r} overlaps its test split, which "
                "gives the held-out accuracy; train on dataset.split=train."
            )
        held_cfg = {**node, "split": "test"}
        return dataset, build("dataset", held_cfg), {"how": "split=test", "dataset_config": held_cfg}
    if "seed" in params:
        seed = int(node.get("seed", params["seed"].default)) + HELD_OUT_SEED_OFFSET
        held_cfg = {**node, "seed": seed}
        return dataset, build("dataset", held_cfg), {"how": f"seed={seed}", "dataset_config": held_cfg}
    n = len(dataset)
    n_held = max(1, round(HELD_OUT_FRACTION * n))
    if n - n_held < 1:
        raise ConfigError(f"train-classifier: dataset {name!r} has {n} item(s); at least 2 are needed.")
    train = Subset(dataset, range(n - n_held))
    held = Subset(dataset, range(n - n_held, n))
    return train, held, {"how": f"last {n_held} of {n} indices", "dataset_config": dict(node)}


def _tensors(dataset: Any, limit: int | None, num_classes: int, data_shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The images and labels of the first ``limit`` items (all when None), as float32 and int64."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n * math.prod(data_shape) * 4 > MAX_PRELOAD_BYTES:
        raise ConfigError(
            f"train-classifier: {n} images of shape {tuple(data_shape)} need more than "
            f"{MAX_PRELOAD_BYTES >> 30} GiB in memory; use a smaller dataset."
        )
    x = torch.empty(n, *data_shape)
    y = torch.empty(n, dtype=torch.long)
    for i in range(n):
        item = dataset[i]
        x[i] = torch.as_tensor(item["x"])
        y[i] = int(item["label"])
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(
            f"train-classifier: labels must lie in 0..{num_classes - 1} (the dataset's num_classes); got "
            f"{int(y.min())}..{int(y.max())}."
        )
    return x, y


def random_shift(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Each image moved by up to ``shift`` pixels in each direction (edges repeated)."""
    if shift == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (len(x), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def _schedule(step: int, steps: int) -> float:
    """Learning-rate factor: linear warm-up over 5 % of the steps, then cosine decay to 0."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.inference_mode()
def _accuracy(net: nn.Module, x: Tensor, y: Tensor, device: torch.device, batch_size: int = 512) -> float:
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = net(x[start:start + batch_size].to(device))
        correct += int((logits.argmax(dim=1).cpu() == y[start:start + batch_size]).sum())
    return correct / max(1, len(x))


def train_classifier(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Train the classifier of ``cfg`` (``unfog train-classifier``) and write it to ``out_dir``.

    Trains :class:`ImageClassifier` with AdamW (Loshchilov & Hutter 2019), warm-up and cosine
    decay, random-shift augmentation and a fixed seed on the dataset's field ``label``; scores
    it on held-out data (:func:`held_out_split`); writes ``classifier.safetensors`` and
    ``classifier.json``.

    Returns:
        ``out_dir``, held-out ``accuracy``, training ``seconds`` and the weights' ``sha256``.

    Raises:
        ConfigError: for bad settings and for datasets that are not labelled images.
    """
    from unfog.config import NAME_KEY, build, plain

    start = time.perf_counter()
    cfg = plain(cfg)
    settings = TrainSettings.from_config(cfg)
    node = dict(plain(cfg.get("dataset")) or {})
    if NAME_KEY not in node:
        raise ConfigError("train-classifier: no dataset chosen; add dataset=NAME (e.g. dataset=digits).")
    name = node[NAME_KEY]
    dataset = build("dataset", node)
    check_labelled_images(name, dataset)
    data_shape = tuple(int(s) for s in dataset.data_shape)
    num_classes = int(dataset.num_classes)
    train_set, held_set, held_out = held_out_split(node, dataset)
    x, y = _tensors(train_set, None, num_classes, data_shape)
    x_held, y_held = _tensors(held_set, settings.eval_samples, num_classes, data_shape)
    device = resolve_device(settings.device)

    torch.manual_seed(settings.seed)
    net = ImageClassifier(data_shape[0], num_classes, settings.width, settings.feature_dim).to(device)
    optim = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _schedule(s, settings.steps))
    generator = torch.Generator().manual_seed(settings.seed)
    train_start = time.perf_counter()
    order, position, loss = torch.randperm(len(x), generator=generator), 0, torch.tensor(float("nan"))
    for _ in range(settings.steps):
        if position + settings.batch_size > len(x) and position > 0:  # a new epoch, reshuffled
            order, position = torch.randperm(len(x), generator=generator), 0
        index = order[position:position + settings.batch_size]
        position += settings.batch_size
        batch = random_shift(x[index], settings.shift, generator).to(device)
        loss = F.cross_entropy(net(batch), y[index].to(device))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        lr_schedule.step()
    net.eval()
    train_seconds = time.perf_counter() - train_start
    accuracy = _accuracy(net, x_held, y_held, device)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    # One metadata key: safetensors writes several in no fixed order, which would change the hash.
    save_file(state, str(weights), metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})
    sha256 = sha256_of(weights)
    class_names = getattr(dataset, "class_names", None) or [str(i) for i in range(num_classes)]
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": {"name": "ImageClassifier", "in_channels": data_shape[0], "num_classes": num_classes,
                         "width": settings.width, "feature_dim": settings.feature_dim},
        "num_classes": num_classes,
        "class_names": list(class_names),
        "data_shape": list(data_shape),
        "data_range": list(dataset.data_range) if dataset.data_range is not None else None,
        "dataset": node,
        "held_out": {**held_out, "n": len(y_held), "accuracy": accuracy},
        "accuracy": accuracy,
        "train": {**dataclasses.asdict(settings), "device": str(device), "n": len(y),
                  "final_loss": float(loss.detach()), "seconds": round(train_seconds, 2),
                  "total_seconds": round(time.perf_counter() - start, 2)},
        "weights": WEIGHTS_FILE,
        "weights_sha256": sha256,
        "versions": versions(),
    }
    (out_dir / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return {"out_dir": str(out_dir), "accuracy": accuracy, "seconds": train_seconds, "sha256": sha256}


def _resolve(path: str | Path) -> tuple[Path, Path]:
    """The weights file and its record for a classifier folder or its .safetensors file."""
    hint = (f"Train one with `{COMMAND}` (e.g. dataset=digits) and pass the folder it prints, or its "
            f"{WEIGHTS_FILE}.")
    if path is None or not str(path) or str(path) == "???":
        raise ConfigError(f"classifier: no classifier given; {hint}")
    p = Path(str(path)).expanduser()
    weights = p / WEIGHTS_FILE if p.is_dir() else p
    record = weights.with_suffix(".json") if weights.name != WEIGHTS_FILE else weights.parent / RECORD_FILE
    if weights.suffix != ".safetensors" or not weights.is_file() or not record.is_file():
        raise ConfigError(
            f"classifier: {str(path)!r} is not a trained classifier (expected a folder holding {WEIGHTS_FILE} "
            f"and {RECORD_FILE}, or that .safetensors file with its .json beside). {hint}"
        )
    return weights, record


class ClassifierExtractor:
    """A classifier trained by ``unfog train-classifier`` as a feature extractor.

    ``features`` are the penultimate activations (N × feature_dim, float64 on the CPU) that
    the classifier-based Fréchet distance compares; ``logits`` are its class scores (for the
    Inception Score and ``class_accuracy``). Images must have the shape it was trained on
    (``data_shape``); values are clamped to the training data's range, nothing is resized.

    Args:
        path: the output folder of ``unfog train-classifier`` or its ``classifier.safetensors``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: images per forward pass.
    """

    name = "classifier"

    def __init__(self, path: str | Path, device: str = "auto", batch_size: int = 256) -> None:
        from safetensors.torch import load_file

        self.path, record_path = _resolve(path)
        try:
            self.record: dict[str, Any] = json.loads(record_path.read_text())
            arch = self.record["architecture"]
            self.data_shape = tuple(int(s) for s in self.record["data_shape"])
            self.num_classes = int(self.record["num_classes"])
            self.class_names = tuple(self.record["class_names"])
            data_range = self.record["data_range"]
            self.data_range = tuple(float(v) for v in data_range) if data_range is not None else None
            if self.record.get("format") != FORMAT or int(self.record["format_version"]) > FORMAT_VERSION:
                raise ValueError(f"format {self.record.get('format')!r} version {self.record.get('format_version')}")
            self.net = ImageClassifier(int(arch["in_channels"]), int(arch["num_classes"]), int(arch["width"]),
                                       int(arch["feature_dim"]))
            self.net.load_state_dict(load_file(str(self.path)))
        except Exception as exc:  # unreadable JSON, missing keys, mismatched or corrupt weights
            raise ConfigError(
                f"classifier: could not load the classifier at {str(self.path.parent)!r} ({type(exc).__name__}: "
                f"{exc}); train it again with `{COMMAND}`."
            ) from exc
        self.weights_sha256 = sha256_of(self.path)
        recorded = self.record.get("weights_sha256")
        if recorded and recorded != self.weights_sha256:
            raise ConfigError(
                f"classifier: {self.path} does not match its {record_path.name} (sha256 {self.weights_sha256[:12]}… "
                f"vs recorded {recorded[:12]}…); the weights were changed after training. Train it again with "
                f"`{COMMAND}`."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"classifier: batch_size must be a positive integer; got {batch_size!r}.")
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.net.to(self.device).eval().requires_grad_(False)
        self.dim = int(arch["feature_dim"])

    @property
    def held_out_accuracy(self) -> float:
        """The classifier's accuracy on held-out real data, measured when it was trained."""
        return float(self.record["accuracy"])

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features (N × dim, float64, CPU) of images N×C×H×W in the training data's range."""
        return self._run(images, logits=False)

    def logits(self, images: Tensor) -> Tensor:
        """Class logits (N × num_classes, float64, CPU)."""
        return self._run(images, logits=True)

    def predict(self, images: Tensor) -> Tensor:
        """The most likely class of each image; -1 for images with non-finite values."""
        x = self._check(images)
        finite = torch.isfinite(x).flatten(1).all(dim=1)
        predicted = torch.full((len(x),), -1, dtype=torch.long)
        if bool(finite.any()):
            predicted[finite] = self.logits(x[finite]).argmax(dim=1)
        return predicted

    def describe(self) -> dict[str, Any]:
        """Name, weights path and hash, feature size, preprocessing and the training record."""
        return {
            "name": self.name,
            "weights": str(self.path),
            "weights_sha256": self.weights_sha256,
            "dim": self.dim,
            "num_classes": self.num_classes,
            "data_shape": list(self.data_shape),
            "preprocessing": (f"images {'×'.join(map(str, self.data_shape))} clamped to {list(self.data_range)}"
                              if self.data_range else f"images {'×'.join(map(str, self.data_shape))}")
                             + ", no resizing; features: penultimate layer (SiLU of a linear map of "
                               "globally average-pooled conv features)",
            "held_out_accuracy": self.held_out_accuracy,
            "held_out": self.record.get("held_out"),
            "dataset": self.record.get("dataset"),
            "architecture": self.record.get("architecture"),
        }

    def _check(self, images: Tensor) -> Tensor:
        x = torch.as_tensor(images).detach()
        if tuple(x.shape[1:]) != self.data_shape or x.ndim != 4:
            raise DataError(
                f"classifier: images must be N×{'×'.join(map(str, self.data_shape))} (the shape it was trained on, "
                f"dataset {self.record.get('dataset')}); got {tuple(x.shape)}. Use a classifier trained on the "
                f"data being generated (`{COMMAND}`)."
            )
        return x

    @torch.inference_mode()
    def _run(self, images: Tensor, logits: bool) -> Tensor:
        x = self._check(images)
        fn = self.net if logits else self.net.features
        out = []
        for start in range(0, len(x), self.batch_size):
            batch = x[start:start + self.batch_size].to(self.device, torch.float32)
            if self.data_range is not None:
                batch = batch.clamp(*self.data_range)
            out.append(fn(batch).to("cpu", torch.float64))
        if not out:
            return torch.empty(0, self.num_classes if logits else self.dim, dtype=torch.float64)
        return torch.cat(out)

    def __repr__(self) -> str:
        return (f"ClassifierExtractor({str(self.path)!r}, classes={self.num_classes}, shape={self.data_shape}, "
                f"held_out_accuracy={self.held_out_accuracy:.4f})")


@register("metric", "class_accuracy")
class ClassAccuracy:
    """Share of generated images that an in-domain classifier assigns to the class they were generated for.

    The classifier comes from ``unfog train-classifier dataset=...`` (the dataset the model
    was trained on); its held-out accuracy on real images, recorded in ``protocol()``, bounds
    what a perfect generator can score. Images with non-finite values count as wrong.
    ``real`` is ignored.

    ``compute()`` gives ``accuracy`` (over all samples), ``per_class_min`` (the lowest accuracy
    of any requested class) and ``n`` (the number of samples).

    Args:
        weights: the classifier's output folder (or its ``classifier.safetensors``).
        device: where the classifier runs: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: images per forward pass.
    """

    def __init__(self, weights: str, device: str = "auto", batch_size: int = 256) -> None:
        self.weights, self.device, self.batch_size = weights, device, batch_size
        self.extractor = ClassifierExtractor(weights, device=device, batch_size=batch_size)
        self._predicted: list[Tensor] = []
        self._labels: list[Tensor] = []

    def reset(self) -> None:
        """Forget every sample seen so far."""
        self._predicted.clear()
        self._labels.clear()

    def update(self, *, generated: Tensor, labels: Tensor | None = None, real: Tensor | None = None) -> None:
        """Classify ``generated`` and compare with the classes ``labels`` they were generated for."""
        k = self.extractor.num_classes
        labels_t = requested_labels("class_accuracy", labels, k, len(generated),
                                    classes=f" (the classifier's {k} classes; is it trained on the model's dataset?)")
        self._predicted.append(self.extractor.predict(generated))
        self._labels.append(labels_t)

    def compute(self) -> dict[str, float]:
        """``accuracy``, ``per_class_min`` and ``n`` over every sample since the last reset."""
        if not self._labels or sum(len(y) for y in self._labels) == 0:
            raise DataError("class_accuracy: no samples to score; call update() with samples first.")
        predicted = torch.cat(self._predicted).numpy()
        labels = torch.cat(self._labels).numpy()
        correct = predicted == labels
        per_class = [float(correct[labels == c].mean()) for c in np.unique(labels)]
        return {"accuracy": float(correct.mean()), "per_class_min": min(per_class), "n": float(len(labels))}

    def protocol(self) -> dict[str, Any]:
        """The metric's arguments and the classifier it judges with (path, sha256, held-out accuracy)."""
        return {
            "metric": "class_accuracy",
            "arguments": {"weights": str(self.weights), "device": self.device, "batch_size": self.batch_size},
            "extractor": self.extractor.describe(),
            "reference": {"source": "labels", "note": "samples are judged against the labels they were generated for"},
        }

    def __repr__(self) -> str:
        return f"ClassAccuracy(weights={str(self.weights)!r}, held_out_accuracy={self.extractor.held_out_accuracy:.4f})"
