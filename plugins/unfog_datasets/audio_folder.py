"""Any folder of sound files, cut into fixed-length clips, optionally labelled by subfolder and captioned."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unfog import register
from unfog.errors import ConfigError
from unfog_datasets._common import check_int
from unfog_datasets.folder import Captions, FolderDataset

# Extensions of the formats libsndfile reads (mp3 and opus need libsndfile ≥ 1.1).
AUDIO_EXTENSIONS: tuple[str, ...] = (
    ".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".snd", ".caf", ".w64",
)
AUDIO_RANGE: tuple[float, float] = (-1.0, 1.0)


def _soundfile() -> Any:
    """The ``soundfile`` module, or a ConfigError saying how to install it."""
    try:
        import soundfile
    except ImportError as exc:  # also OSError-free: soundfile raises ImportError without libsndfile
        raise ConfigError(
            f"audio_folder: reading sound files needs the soundfile package ({exc}). "
            "Install it with: pip install 'unfog[audio]'"
        ) from exc
    return soundfile


def _ratio(source_rate: int, target_rate: int) -> tuple[int, int]:
    """(up, down) in lowest terms, for ``scipy.signal.resample_poly``."""
    g = math.gcd(source_rate, target_rate)
    return target_rate // g, source_rate // g


def load_clip(
    path: str | Path, *, sample_rate: int, length: int, channels: int, rng: np.random.Generator
) -> Tensor:
    """A ``channels``×``length`` float32 clip from one file, at ``sample_rate``.

    The file is resampled when its rate differs (polyphase filtering, ``resample_poly``), a
    window of ``length`` samples is cut at a start drawn from ``rng`` (zero-padded at the end
    when the file is shorter), channels are averaged to mono for ``channels`` = 1 or the
    first ``channels`` kept (repeated cyclically when the file has fewer), and values are
    clipped to [-1, 1]. Only the part of the file around the window is decoded. Raises
    whatever soundfile raises for unreadable files, and ValueError for a file without audio.
    """
    sf = _soundfile()
    info = sf.info(str(path))
    frames, rate = int(info.frames), int(info.samplerate)
    if frames < 1 or rate < 1:
        raise ValueError(f"the file holds no audio ({frames} frames at {rate} Hz)")
    up, down = _ratio(rate, sample_rate)
    total = -(-frames * up // down)  # resample_poly's output length: ceil(frames·up/down)
    start = int(rng.integers(0, total - length + 1)) if total > length else 0
    want = min(length, total)
    if up == down:
        data = sf.read(str(path), start=start, frames=want, dtype="float32", always_2d=True)[0]
    else:
        data = _resampled_window(sf, path, start, want, frames, up, down)
    clip = _match_channels(data.T, channels)
    out = np.zeros((channels, length), dtype=np.float32)
    n = min(length, clip.shape[1])
    out[:, :n] = np.clip(clip[:, :n], -1.0, 1.0)
    return torch.from_numpy(out)


def _resampled_window(sf: Any, path: str | Path, start: int, want: int, frames: int, up: int, down: int) -> np.ndarray:
    """Output samples ``start .. start+want`` of resampling the whole file by up/down, decoding
    only the source frames the filter needs.

    Output sample j sits at source position j·down/up. Decoding from a source frame that is
    a multiple of ``down`` keeps the output grid aligned, and a margin of the filter's
    half-length (10·max(up, down) samples at the up-sampled rate, scipy's default) on both
    sides makes the window equal to the same samples of the whole-file result.
    """
    from scipy.signal import resample_poly

    margin = -(-10 * max(up, down) // up) + 2
    first = max(0, (start * down // up - margin) // down * down)
    last = min(frames, -(-(start + want) * down // up) + margin)
    data = sf.read(str(path), start=first, frames=last - first, dtype="float32", always_2d=True)[0]
    res = resample_poly(data.astype(np.float64), up, down, axis=0)
    offset = start - first * up // down
    return res[offset: offset + want].astype(np.float32)


def _match_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Mix (C, L) down to mono for ``channels`` = 1, else keep the first ``channels`` rows
    (repeating the file's channels cyclically when it has fewer)."""
    if channels == 1:
        return x.mean(axis=0, keepdims=True)
    return x[np.arange(channels) % x.shape[0]]


@register("dataset", "audio_folder")
class AudioFolder(FolderDataset):
    """Every sound file under a folder (searched recursively), as fixed-length clips.

    Files are read with soundfile (libsndfile: wav, flac, ogg, aiff, au, caf, w64, and mp3
    or opus where the library supports them; any letter case; hidden files skipped),
    resampled to ``sample_rate`` when their rate differs (``scipy.signal.resample_poly``),
    and cut to ``length`` samples: item ``i`` takes a window at a random start drawn from
    (``seed``, ``i``), so the same index always gives the same clip, and files shorter than
    ``length`` are zero-padded at the end. ``channels`` = 1 mixes all channels down to mono;
    more keeps the first ``channels``. Values lie in [-1, 1] (float files are clipped). When
    every file lies in an immediate or deeper subfolder of ``root``, the names of the
    immediate subfolders, sorted, are the classes 0..K-1 (field ``label``); otherwise the
    clips are unlabelled. Captions (field ``caption``) come from a ``metadata.jsonl`` (lines
    ``{"file_name": "a.wav", "text": "..."}``) or a ``NAME.txt`` beside ``NAME.wav``. Files
    are read when requested, not held in memory.

    Args:
        root: the folder (``~`` is expanded).
        sample_rate: samples per second of the clips.
        length: samples per clip.
        channels: 1 for mono (mixed down), or the number of channels to keep.
        seed: seed of the crop positions (a non-negative integer).
        skip_bad_files: check every file when the dataset is built and leave out those that
            cannot be read (listed in ``skipped``), instead of failing when one is loaded.
        captions: ``auto`` uses captions when the folder has any and refuses files without
            one; ``optional`` gives those the caption ``""``; ``none`` ignores captions.
    """

    name = "audio_folder"
    what = "sound"
    extensions = AUDIO_EXTENSIONS

    def __init__(
        self,
        root: str,
        sample_rate: int = 16000,
        length: int = 16384,
        channels: int = 1,
        seed: int = 0,
        skip_bad_files: bool = False,
        captions: Captions = "auto",
    ) -> None:
        check_int("audio_folder", "sample_rate", sample_rate, minimum=1)
        check_int("audio_folder", "length", length, minimum=1)
        check_int("audio_folder", "channels", channels, minimum=1)
        check_int("audio_folder", "seed", seed, minimum=0)
        _soundfile()
        self.sample_rate, self.length, self.channels, self.seed = sample_rate, length, channels, seed
        self.data_shape: tuple[int, ...] = (channels, length)
        self.data_range: tuple[float, float] | None = AUDIO_RANGE
        super().__init__(root, skip_bad_files=skip_bad_files, captions=captions)

    def load(self, path: str, index: int) -> Tensor:
        """The clip of item ``index``: its window start is drawn from (``seed``, ``index``)."""
        rng = np.random.default_rng([self.seed, index])
        return load_clip(path, sample_rate=self.sample_rate, length=self.length, channels=self.channels, rng=rng)

    def check(self, path: Path) -> None:
        """Read the header and the first frame of ``path``, raising if it holds no audio."""
        sf = _soundfile()
        if sf.info(str(path)).frames < 1:
            raise ValueError("the file holds no audio")
        sf.read(str(path), frames=1, dtype="float32")

    def settings_repr(self) -> list[str]:
        """The sample rate, shown in ``repr``."""
        return [f"sample_rate={self.sample_rate}"]
