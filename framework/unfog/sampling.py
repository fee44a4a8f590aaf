"""Drawing samples from a model: per-sample seeds, batching and conditioning values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from unfog.diffusion import SeededNoise
from unfog.errors import ConfigError
from unfog.model import DiffusionModel, Guidance
from unfog.protocols import Sampler, Schedule


def default_values(model: DiffusionModel, n: int, examples: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Conditioning values for ``n`` samples when none are given: labels cycle 0, 1, ..., K−1;
    a conditioner with ``grid_values(n)`` (e.g. ``scalar``) gives its own spread of values;
    any other (a caption, an image to upscale) takes its field from ``examples``, ``n`` rows
    of real data (:func:`dataset_examples`), through its ``example_value`` if it has one
    (``image_concat`` adds fixed inpainting masks)."""
    values: dict[str, Any] = {}
    for name, c in model.conditioners.items():
        if c.field in values:
            continue
        k = getattr(c, "num_classes", None)
        if hasattr(c, "grid_values"):
            values[c.field] = c.grid_values(n)
        elif k is not None:
            values[c.field] = torch.arange(n) % k
        elif examples is not None and c.field in examples:
            example = examples[c.field]
            values[c.field] = c.example_value(example) if hasattr(c, "example_value") else example
        else:
            raise ConfigError(
                f"conditioner {name!r} needs values for field {c.field!r} to sample; pass them explicitly."
            )
    return values


def dataset_examples(dataset: Any, n: int, fields: Sequence[str]) -> dict[str, Any]:
    """``fields`` of ``n`` dataset rows spread evenly over it (the same rows every time),
    batched the way a DataLoader batches them."""
    from torch.utils.data import default_collate

    if not fields or n <= 0:
        return {}
    step = max(1, len(dataset) // n)
    items = [dataset[(k * step) % len(dataset)] for k in range(n)]
    return {f: default_collate([item[f] for item in items]) for f in fields if f in items[0]}


def take(value: Any, index: slice | Sequence[int]) -> Any:
    """Rows ``index`` of a batch field: a tensor or array, a list (of captions, say), or a
    mapping of those (an image and its mask)."""
    if isinstance(value, Mapping):
        return {k: take(v, index) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return value[index] if isinstance(index, slice) else [value[int(i)] for i in index]
    tensor = torch.as_tensor(value)
    return tensor[index] if isinstance(index, slice) else tensor[torch.as_tensor(list(index), dtype=torch.long)]


@torch.no_grad()
def generate(
    model: DiffusionModel,
    schedule: Schedule,
    sampler: Sampler,
    prediction: str,
    data_shape: Sequence[int],
    indices: Sequence[int],
    *,
    seed: int = 0,
    values: Mapping[str, Any] | None = None,
    guidance: Guidance = 1.0,
    clip: tuple[float, float] | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    sigma_data: float | None = None,
    progress: bool = False,
    guidance_rescale: float = 0.0,
    guidance_interval: Sequence[float] | None = None,
) -> Tensor:
    """Samples number ``indices`` of a run seeded with ``seed``.

    Each sample's noise comes from its own stream (:class:`SeededNoise`), so sample k is the
    same whatever the batch size or the set of other indices drawn with it. ``values`` maps
    batch fields to per-sample conditioning values aligned with ``indices``; ``sigma_data``
    is the model's σ_data when it predicts ``edm`` (None: the schedule's, else 0.5). With
    ``progress`` a bar with an ETA counts the samples drawn. ``guidance`` (one scale or one
    per conditioner), ``guidance_rescale`` and ``guidance_interval`` are
    :meth:`DiffusionModel.denoiser`'s.
    """
    was_training = model.training
    model.eval()
    out = []
    indices = list(indices)
    # Noise at t = 1 is σ(1)·ε: 1 for variance-preserving paths, σ_max for variance-exploding ones.
    scale = float(schedule.sigma(torch.tensor([1.0], dtype=torch.float64))[0])
    bar = _bar(len(indices)) if progress else None
    try:
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            rng = SeededNoise.for_indices(seed, idx)
            noise = scale * rng.randn_like(torch.empty(len(idx), *data_shape, device=device))
            batch_values = {k: take(v, slice(start, start + len(idx))) for k, v in (values or {}).items()}
            denoiser = model.denoiser(schedule, prediction, batch_values, len(idx), guidance, clip, sigma_data,
                                      guidance_rescale, guidance_interval)
            out.append(sampler.sample(denoiser, noise, rng).float().cpu())
            if bar is not None:
                bar.update(len(idx))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return torch.cat(out) if out else torch.empty(0, *data_shape)


def _bar(total: int) -> Any:
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc="sample", unit="sample", file=sys.stderr, dynamic_ncols=True, smoothing=0)


def shard(n: int, rank: int, world: int) -> list[int]:
    """The sample indices process ``rank`` of ``world`` draws out of ``n``: rank, rank + world, …,
    padded by repeating one index so every process draws ⌈n/world⌉ (sharded models need every
    process to run the same number of forwards; a repeated sample is identical, so harmless)."""
    own = list(range(rank, n, world))
    size = -(-n // world) if n else 0
    return own + [own[-1] if own else 0] * (size - len(own))


def select(values: Mapping[str, Any] | None, indices: Sequence[int]) -> dict[str, Any] | None:
    """The rows ``indices`` of per-sample conditioning ``values``."""
    if values is None:
        return None
    return {k: take(v, list(indices)) for k, v in values.items()}


def gather(part: Tensor, indices: Sequence[int], n: int) -> Tensor:
    """All ``n`` samples, from each process's ``part`` (its ``indices``), on every process.

    Without an initialized process group this is ``part`` itself (which must then be all of them).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if len(part) != n:
            raise ValueError(f"gather: one process holds {len(part)} of {n} samples and there is no process group.")
        return part
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (list(indices), part.cpu()))
    out = torch.empty(n, *part.shape[1:], dtype=part.dtype)
    for idx, p in parts:
        out[torch.as_tensor(idx, dtype=torch.long)] = p
    return out
