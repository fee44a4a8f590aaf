"""CIFAR-10 and MNIST through ``torchvision.datasets``, as [-1, 1] image tensors with labels."""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from unfog import register
from unfog.errors import DataError
from unfog_datasets._common import IMAGE_RANGE, check_choice, check_index, uint8_to_unit

DEFAULT_ROOT = "~/.cache/unfog/data"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _torchvision_datasets(owner: str) -> Any:
    try:
        import torchvision.datasets as tvd
    except ImportError as exc:
        raise DataError(
            f"{owner}: this dataset is read with torchvision, which could not be imported ({exc}). "
            "Install it with `pip install torchvision` (or `pip install unfog[vision]`)."
        ) from exc
    return tvd


def _root(root: str) -> str:
    return os.path.abspath(os.path.expanduser(str(root)))


def _absent(owner: str, what: str, download: bool, exc: Exception, todo: str) -> DataError:
    detail = " ".join(str(exc).split())
    if download:
        why = f"downloading it failed ({type(exc).__name__}: {detail})"
        fix = f"{todo}, or run once where the network is reachable (dataset.download=true)."
    else:
        why = f"dataset.download=false (torchvision: {detail})"
        fix = f"{todo}, or set dataset.download=true where the network is reachable."
    return DataError(f"{owner}: {what}, and {why}. {fix}")


class _TorchvisionImages(Dataset):
    """Shared part: uint8 images N×C×H×W and labels N held in memory, scaled per item."""

    images: Tensor
    labels: Tensor
    pad: int = 0
    _owner = "dataset"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index(self._owner, index, len(self.labels))
        x = uint8_to_unit(self.images[i])
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, value=-1.0)
        return {"x": x, "label": self.labels[i]}


@register("dataset", "cifar10")
class CIFAR10(_TorchvisionImages):
    """CIFAR-10: 32×32 colour images of 10 classes (50,000 train, 10,000 test), in [-1, 1].

    Read with ``torchvision.datasets.CIFAR10`` from ``<root>/cifar-10-batches-py``, which
    torchvision downloads (170 MB) when ``download`` is true and the data is absent.

    Args:
        root: folder that holds (or will hold) ``cifar-10-batches-py``; ``~`` is expanded.
        download: download the data when it is absent.
        split: ``"train"`` or ``"test"``.
    """

    _owner = "cifar10"

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        download: bool = True,
        split: Literal["train", "test"] = "train",
    ) -> None:
        check_choice("cifar10", "split", split, ("train", "test"))
        tvd = _torchvision_datasets("cifar10")
        self.root = _root(root)
        self.split = split
        folder = os.path.join(self.root, tvd.CIFAR10.base_folder)
        try:
            ds = tvd.CIFAR10(self.root, train=split == "train", download=download)
        except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, tarfile errors...
            raise _absent(
                "cifar10",
                f"the CIFAR-10 data is not complete and intact in {folder!r} (expected data_batch_1..5, "
                "test_batch and batches.meta)",
                download,
                exc,
                f"Download {CIFAR10_URL} and extract it into {self.root!r} so that {folder!r} exists",
            ) from exc
        self.images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # N×3×32×32 uint8
        self.labels = torch.as_tensor(ds.targets, dtype=torch.long)
        self.data_shape: tuple[int, ...] = (3, 32, 32)
        self.data_range: tuple[float, float] | None = IMAGE_RANGE
        self.fields: tuple[str, ...] = ("x", "label")
        self.num_classes: int | None = 10
        self.class_names: tuple[str, ...] | None = tuple(ds.classes)

    def __repr__(self) -> str:
        return f"CIFAR10(root={self.root!r}, split={self.split!r}, n={len(self)})"


@register("dataset", "mnist")
class MNIST(_TorchvisionImages):
    """MNIST: 28×28 greyscale handwritten digits 0-9 (60,000 train, 10,000 test), in [-1, 1].

    Read with ``torchvision.datasets.MNIST`` from ``<root>/MNIST/raw``, which torchvision
    downloads (12 MB) when ``download`` is true and the data is absent.

    Args:
        root: folder that holds (or will hold) ``MNIST/raw``; ``~`` is expanded.
        download: download the data when it is absent.
        split: ``"train"`` or ``"test"``.
        pad_to_32: pad each image with 2 background pixels per side to 32×32 (convenient for
            U-Nets that halve the resolution several times).
    """

    _owner = "mnist"

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        download: bool = True,
        split: Literal["train", "test"] = "train",
        pad_to_32: bool = False,
    ) -> None:
        check_choice("mnist", "split", split, ("train", "test"))
        tvd = _torchvision_datasets("mnist")
        self.root = _root(root)
        self.split = split
        self.pad = 2 if pad_to_32 else 0
        folder = os.path.join(self.root, "MNIST", "raw")
        try:
            ds = tvd.MNIST(self.root, train=split == "train", download=download)
        except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, gzip errors...
            raise _absent(
                "mnist",
                f"the MNIST data is not complete and readable in {folder!r} "
                f"(expected {', '.join(MNIST_FILES)})",
                download,
                exc,
                f"Put those four files (unpacked from the .gz files of the MNIST site) into {folder!r}",
            ) from exc
        self.images = ds.data.unsqueeze(1).contiguous()  # N×1×28×28 uint8
        self.labels = torch.as_tensor(ds.targets, dtype=torch.long)
        side = 28 + 2 * self.pad
        self.data_shape: tuple[int, ...] = (1, side, side)
        self.data_range: tuple[float, float] | None = IMAGE_RANGE
        self.fields: tuple[str, ...] = ("x", "label")
        self.num_classes: int | None = 10
        self.class_names: tuple[str, ...] | None = tuple(str(i) for i in range(10))

    def __repr__(self) -> str:
        return f"MNIST(root={self.root!r}, split={self.split!r}, n={len(self)}, shape={self.data_shape})"
