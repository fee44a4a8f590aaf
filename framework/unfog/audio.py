"""Turning samples into sound: 16-bit PCM WAV files, written with the standard library."""

from __future__ import annotations

import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

PCM_MAX = 32767  # the largest 16-bit sample; -1..1 maps to -32767..32767


def is_audio(data_shape: Sequence[int]) -> bool:
    """Whether samples of this shape are sound: (channels, length), rank 2."""
    return len(tuple(data_shape)) == 2


def write_wavs(samples: Tensor, sample_rate: int, folder: str | Path, prefix: str = "sample") -> list[Path]:
    """Write each sample as a 16-bit PCM WAV file ``{prefix}_{i:04d}.wav`` in ``folder``.

    Args:
        samples: clips (N, C, L) with C channels of L samples in [-1, 1], or (N, L) for mono;
            values outside are clipped, NaN becomes silence.
        sample_rate: samples per second, stored in each file's header.
        folder: where to write (created if missing).
        prefix: the start of every file name.

    Returns:
        The paths written, in sample order.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1:
        raise ValueError(f"write_wavs: sample_rate must be a positive integer; got {sample_rate!r}.")
    x = torch.as_tensor(samples).detach().to("cpu", torch.float64)
    if x.ndim == 2:
        x = x[:, None]
    if x.ndim != 3 or x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(
            f"write_wavs: samples must have shape (N, C, L) or (N, L) with C, L ≥ 1; got {tuple(x.shape)}."
        )
    pcm = np.round(np.nan_to_num(x.numpy(), nan=0.0).clip(-1.0, 1.0) * PCM_MAX).astype("<i2")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(len(pcm) - 1)))
    paths = []
    for i, clip in enumerate(pcm):
        path = folder / f"{prefix}_{i:0{width}d}.wav"
        with wave.open(str(path), "wb") as f:
            f.setnchannels(clip.shape[0])
            f.setsampwidth(2)
            f.setframerate(int(sample_rate))
            f.writeframes(np.ascontiguousarray(clip.T).tobytes())  # frames interleave the channels
        paths.append(path)
    return paths
