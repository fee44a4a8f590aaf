"""Any folder of sound files, cut into fixed-length clips, optionally labelled by subfolder."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from unfog import register
from unfog.errors import ConfigError, DataError
from unfog_datasets._common import check_index, check_int, readable_files

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


def find_audio(root: Path) -> list[Path]:
    """Sound files under ``root`` (recursively, extension case-insensitive), sorted; hidden
    files and folders (names starting with ``.``) are left out."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS:
                found.append(Path(dirpath, name))
    return sorted(found)


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
class AudioFolder(Dataset):
    """Every sound file under a folder (searched recursively), as fixed-length clips.

    Files are read with soundfile (libsndfile: wav, flac, ogg, aiff, au, caf, w64, and mp3
    or opus where the library supports them; any letter case; hidden files skipped),
    resampled to ``sample_rate`` when their rate differs (``scipy.signal.resample_poly``),
    and cut to ``length`` samples: item ``i`` takes a window at a random start drawn from
    (``seed``, ``i``), so the same index always gives the same clip, and files shorter than
    ``length`` are zero-padded at the end. ``channels`` = 1 mixes all channels down to mono;
    more keeps the first ``channels``. Values lie in [-1, 1] (float files are clipped). When
    every file lies in an immediate or deeper subfolder of ``root``, the names of the
    immediate subfolders, sorted, are the classes 0..K-1; otherwise the clips are
    unlabelled. Files are read when requested, not held in memory.

    Args:
        root: the folder (``~`` is expanded).
        sample_rate: samples per second of the clips.
        length: samples per clip.
        channels: 1 for mono (mixed down), or the number of channels to keep.
        seed: seed of the crop positions (a non-negative integer).
        skip_bad_files: check every file when the dataset is built and leave out those that
            cannot be read (listed in ``skipped``), instead of failing when one is loaded.
    """

    def __init__(
        self,
        root: str,
        sample_rate: int = 16000,
        length: int = 16384,
        channels: int = 1,
        seed: int = 0,
        skip_bad_files: bool = False,
    ) -> None:
        check_int("audio_folder", "sample_rate", sample_rate, minimum=1)
        check_int("audio_folder", "length", length, minimum=1)
        check_int("audio_folder", "channels", channels, minimum=1)
        check_int("audio_folder", "seed", seed, minimum=0)
        if not isinstance(root, (str, os.PathLike)) or not str(root):
            raise ConfigError(f"audio_folder: root must be the path of a folder of sound files; got {root!r}.")
        _soundfile()
        path = Path(root).expanduser()
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
            raise ConfigError(
                f"audio_folder: root {str(path)!r} {what} (root={root!r}). "
                "Set dataset.root to a folder holding sound files."
            )
        files = find_audio(path)
        if not files:
            raise ConfigError(
                f"audio_folder: no sound files found under {str(path)!r} (searched recursively for "
                f"{', '.join(AUDIO_EXTENSIONS)}, any letter case). Check dataset.root."
            )
        self.root = str(path)
        self.sample_rate, self.length, self.channels, self.seed = sample_rate, length, channels, seed
        self.skip_bad_files = skip_bad_files
        self.skipped: list[str] = []
        if skip_bad_files:
            files = self._drop_bad(files)

        rel_parts = [f.relative_to(path).parts for f in files]
        labelled = all(len(parts) > 1 for parts in rel_parts)
        self.files: list[str] = [str(f) for f in files]
        self.data_shape: tuple[int, ...] = (channels, length)
        self.data_range: tuple[float, float] | None = AUDIO_RANGE
        if labelled:
            names = sorted({parts[0] for parts in rel_parts})
            index = {name: i for i, name in enumerate(names)}
            self.labels: list[int] | None = [index[parts[0]] for parts in rel_parts]
            self.class_names: tuple[str, ...] | None = tuple(names)
            self.num_classes: int | None = len(names)
            self.fields: tuple[str, ...] = ("x", "label")
        else:
            self.labels = None
            self.class_names = None
            self.num_classes = None
            self.fields = ("x",)

    def _drop_bad(self, files: list[Path]) -> list[Path]:
        sf = _soundfile()

        def check(f: Path) -> None:
            if sf.info(str(f)).frames < 1:
                raise ValueError("the file holds no audio")
            sf.read(str(f), frames=1, dtype="float32")

        return readable_files("audio_folder", files, self.root, "sound", check, self.skipped)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index("audio_folder", index, len(self.files))
        path = self.files[i]
        rng = np.random.default_rng([self.seed, i])
        try:
            x = load_clip(path, sample_rate=self.sample_rate, length=self.length, channels=self.channels, rng=rng)
        except ConfigError:
            raise
        except Exception as exc:  # libsndfile reports broken files with several error types
            hint = (
                "The file was readable when the dataset was built; check whether it changed."
                if self.skip_bad_files
                else "Fix or remove it, or pass `dataset.skip_bad_files=true` to skip unreadable files."
            )
            raise DataError(
                f"audio_folder: cannot read sound file {path!r} ({type(exc).__name__}: {exc}). {hint}"
            ) from exc
        item: dict[str, Any] = {"x": x}
        if self.labels is not None:
            item["label"] = torch.tensor(self.labels[i], dtype=torch.long)
        return item

    def __repr__(self) -> str:
        labels = f"{self.num_classes} classes" if self.num_classes is not None else "unlabelled"
        return (
            f"AudioFolder(root={self.root!r}, n={len(self)}, sample_rate={self.sample_rate}, "
            f"shape={self.data_shape}, {labels})"
        )
