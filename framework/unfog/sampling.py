"""Drawing samples from a model: per-sample seeds, batching and conditioning values.

:func:`draw` is the loop under :meth:`unfog.pipeline.Pipeline.generate` (the way every command
and callback draws); the rest says which conditioning values each sample gets: the user's
(``labels``, ``prompt``, ``values``), a conditioner's own grid, or rows of real data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unfog.diffusion import SeededNoise
from unfog.errors import ConfigError, DataError
from unfog.model import DiffusionModel, Guidance
from unfog.protocols import ClassConditioner, ExampleValue, GridValues, Sampler, Schedule, TextConditioner


def is_text(conditioner: Any) -> bool:
    """Whether a conditioner reads strings (:class:`~unfog.protocols.TextConditioner`)."""
    return isinstance(conditioner, TextConditioner) and bool(conditioner.takes_text)


def num_classes_of(conditioner: Any) -> int | None:
    """The number of classes of a label conditioner (:class:`~unfog.protocols.ClassConditioner`), else None."""
    if isinstance(conditioner, ClassConditioner) and conditioner.num_classes:
        return int(conditioner.num_classes)
    return None


def default_values(conditioners: Mapping[str, Any], n: int,
                   examples: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Conditioning values for ``n`` samples when none are given: labels cycle 0, 1, ..., K−1;
    a conditioner with its own ``grid_values(n)`` (e.g. ``scalar``) gives its spread of values;
    any other (a caption, an image to upscale) takes its field from ``examples``, ``n`` rows of
    real data (:func:`dataset_examples`), through its ``example_value`` if it has one
    (``image_concat`` adds fixed inpainting masks)."""
    values: dict[str, Any] = {}
    for name, c in conditioners.items():
        if c.field in values:
            continue
        k = num_classes_of(c)
        if isinstance(c, GridValues):
            values[c.field] = c.grid_values(n)
        elif k is not None:
            values[c.field] = torch.arange(n) % k
        elif examples is not None and c.field in examples:
            example = examples[c.field]
            values[c.field] = c.example_value(example) if isinstance(c, ExampleValue) else example
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


def requested_values(conditioners: Mapping[str, Any], n: int, request: Mapping[str, Any],
                     examples: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Per-sample conditioning values for a command's ``labels``, ``prompt``/``prompts`` (a text
    file) and ``values`` (an .npz of batch fields), each cycled over the ``n`` samples; fields
    none of them gives follow :func:`default_values` (with ``examples`` as its real rows)."""
    import numpy as np

    given = {k: request.get(k) for k in ("labels", "prompt", "prompts", "values")}
    if not len(conditioners):
        used = [k for k, v in given.items() if v]
        if used:
            raise ConfigError(f"{', '.join(used)}=... was given, but this model has no conditioner.")
        return None
    values: dict[str, Any] = {}

    def cycle(items: Any) -> Any:
        idx = [k % len(items) for k in range(n)]
        return [items[i] for i in idx] if isinstance(items, list) else torch.as_tensor(items)[idx]

    if given["values"]:
        path = Path(given["values"])
        if not path.is_file():
            raise ConfigError(f"values={path} does not exist; give an .npz whose arrays are batch fields.")
        try:
            with np.load(path, allow_pickle=False) as data:
                values |= {k: cycle([str(v) for v in data[k]] if data[k].dtype.kind in "US" else data[k])
                           for k in data.files}
        except (OSError, ValueError) as exc:
            raise DataError(f"values={path} is not a readable .npz of arrays ({exc}).") from None
    if given["labels"]:
        fields = [c.field for c in conditioners.values() if num_classes_of(c)]
        if not fields:
            raise ConfigError(f"labels=... was given, but no conditioner of this model reads labels "
                              f"(its conditioners: {list(conditioners)}).")
        values[fields[0]] = cycle(torch.tensor(list(given["labels"])))
    if given["prompt"] or given["prompts"]:
        values |= _prompt_values(conditioners, given["prompt"], given["prompts"], cycle)
    missing = {c.field for c in conditioners.values()} - set(values)
    if missing:
        picked = default_values(conditioners, n, examples)  # raises, naming the conditioner, when nothing fits
        values |= {f: picked[f] for f in missing}
    return values


def _prompt_values(conditioners: Mapping[str, Any], prompt: str | None, prompts: str | None,
                   cycle: Any) -> dict[str, Any]:
    if prompt and prompts:
        raise ConfigError("give prompt=TEXT or prompts=FILE, not both.")
    fields = [c.field for c in conditioners.values() if is_text(c)]
    if not fields:
        raise ConfigError(f"prompt/prompts was given, but no conditioner of this model reads text "
                          f"(its conditioners: {list(conditioners)}).")
    if prompts:
        path = Path(prompts)
        if not path.is_file():
            raise ConfigError(f"prompts={path} does not exist; give a text file with one prompt per line.")
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if not lines:
            raise DataError(f"prompts={path} holds no prompts; write one prompt per line.")
    else:
        lines = [str(prompt)]
    return {f: cycle(lines) for f in fields}


def labels_of(conditioners: Mapping[str, Any], values: Mapping[str, Any] | None) -> Tensor | None:
    """The class labels the samples were drawn for, if a label conditioner got some."""
    for c in conditioners.values():
        if num_classes_of(c) and values and c.field in values:
            return torch.as_tensor(values[c.field])
    return None


def captions_of(conditioners: Mapping[str, Any], values: Mapping[str, Any] | None) -> list[str] | None:
    """The captions the samples were drawn for, if a text conditioner got some."""
    for c in conditioners.values():
        if is_text(c) and values and c.field in values:
            return list(values[c.field])
    return None


def classes_of(conditioners: Mapping[str, Any]) -> int | None:
    """The number of classes of the first label conditioner (a grid's columns), else None."""
    for c in conditioners.values():
        k = num_classes_of(c)
        if k:
            return k
    return None


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
def draw(
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
    decode: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Samples number ``indices`` of a run seeded with ``seed`` (what
    :meth:`unfog.pipeline.DiffusionPipeline.generate` runs).

    Each sample's noise comes from its own stream (:class:`SeededNoise`), so sample k is the
    same whatever the batch size or the set of other indices drawn with it. ``values`` maps
    batch fields to per-sample conditioning values aligned with ``indices``; ``sigma_data``
    is the model's σ_data when it predicts ``edm`` (None: the schedule's, else 0.5). With
    ``progress`` a bar with an ETA counts the samples drawn. ``guidance`` (one scale or one
    per conditioner), ``guidance_rescale`` and ``guidance_interval`` are
    :meth:`DiffusionModel.denoiser`'s. ``decode`` maps each batch of samples before it leaves
    the device (a latent model's decoder).
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
            samples = sampler.sample(denoiser, noise, rng)
            out.append((decode(samples) if decode is not None else samples).float().cpu())
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
