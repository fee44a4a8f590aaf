"""A data order that survives interruption and does not depend on the number of devices."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

Position = Callable[[], tuple[int, int, int]]
"""Returns (global batches already consumed, this process's rank, number of processes)."""


def mix(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (NumPy's SeedSequence hash)."""
    return int(np.random.SeedSequence([v % 2**64 for v in values]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Each item of a batch (B, C, H, W) mirrored left-right with probability 1/2, by the global
    RNG (which training reseeds per batch, so a resumed run flips the same items)."""
    mirror = (torch.rand(x.shape[0]) < 0.5).to(x.device).view(-1, *([1] * (x.ndim - 1)))
    return torch.where(mirror, x.flip(-1), x)


def step_seed(seed: int, batch: int, rank: int) -> int:
    """The seed of training batch ``batch`` on process ``rank`` of a run seeded with ``seed``."""
    return mix(seed, batch, rank, 0)


class ResumableSampler(Sampler[int]):
    """Dataset indices as one endless stream of seeded permutations, cut into global batches.

    Pass p of the data is ``randperm(size)`` drawn from the seed (seed, p); the stream is
    the passes one after another. Global batch k is stream positions [k·G, (k+1)·G) with
    G = ``batch_size`` × processes, and process r reads its slice [k·G + r·B, k·G + (r+1)·B).
    Each iteration (a Lightning epoch) starts at the batch ``position()`` reports, so a run
    resumed from a checkpoint at any step continues the exact order of an uninterrupted
    one, and N processes together read what one process with N× the batch would.

    Args:
        size: number of items in the dataset.
        batch_size: the per-process batch size.
        seed: the stream's seed.
        position: called at the start of each iteration (and by ``len``); defaults to
            (0, 0, 1), a single process from the start.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, position: Position | None = None) -> None:
        if size < 1 or batch_size < 1:
            raise ValueError(f"ResumableSampler needs size ≥ 1 and batch_size ≥ 1; got {size} and {batch_size}.")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.position: Position = position or (lambda: (0, 0, 1))
        self._perms: dict[int, np.ndarray] = {}

    def batches_per_iteration(self) -> int:
        """About one pass over the data: ⌈size / G⌉ batches."""
        world = self.position()[2]
        return max(1, math.ceil(self.size / (self.batch_size * world)))

    def __len__(self) -> int:
        return self.batches_per_iteration() * self.batch_size

    def __iter__(self) -> Iterator[int]:
        start, rank, world = self.position()
        g, b = self.batch_size * world, self.batch_size
        for k in range(start, start + self.batches_per_iteration()):
            yield from self.indices(k * g + rank * b, b)

    def indices(self, begin: int, count: int) -> list[int]:
        """The dataset indices at stream positions ``begin`` … ``begin + count − 1``."""
        out: list[int] = []
        while count > 0:
            p, offset = divmod(begin, self.size)
            take = min(count, self.size - offset)
            out.extend(self._perm(p)[offset : offset + take].tolist())
            begin, count = begin + take, count - take
        return out

    def _perm(self, p: int) -> np.ndarray:
        if p not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(mix(self.seed, p, 0, 1))
            self._perms[p] = torch.randperm(self.size, generator=g).numpy()
        return self._perms[p]
