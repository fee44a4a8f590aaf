"""Procedurally synthesised notes, chords and chirps: a small audio dataset with known pitches.

Every clip is generated on the fly from ``(seed, index)``: no files, no downloads. All
frequencies come from :func:`pitch_set` (the equal-tempered pitches from A3 to A5), so the
``tones_spectrum`` metric can check whether generated clips land on them.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from unfog import register
from unfog.errors import ConfigError
from unfog_datasets._common import check_index, check_int

KINDS: tuple[str, ...] = ("note", "chord", "chirp")
AUDIO_RANGE: tuple[float, float] = (-1.0, 1.0)
A4_HZ = 440.0
A4_MIDI = 69
LOWEST_MIDI, HIGHEST_MIDI = 57, 81  # A3 (220 Hz) .. A5 (880 Hz): 25 pitches, two octaves
NOTE_NAMES: tuple[str, ...] = ("C", "C sharp", "D", "D sharp", "E", "F", "F sharp", "G", "G sharp", "A",
                               "A sharp", "B")
TRIADS: dict[str, tuple[int, int, int]] = {"major": (0, 4, 7), "minor": (0, 3, 7)}  # semitones above the root
ATTACK_S = 0.01  # linear fade-in, so no clip starts with a click
RELEASE_S = 0.02  # linear fade-out at the end
DECAY_S = (0.3, 1.5)  # range of the time constant of the exponential decay
AMPLITUDE = (0.5, 0.9)  # range of each clip's peak amplitude
GLIDE_SHARE = 1.0 / 3.0  # a chirp sweeps over this share of the clip, then holds its second pitch


def midi_to_hz(midi: int | float) -> float:
    """The equal-tempered frequency of a MIDI note number (A4 = 69 = 440 Hz)."""
    return A4_HZ * 2.0 ** ((float(midi) - A4_MIDI) / 12.0)


@functools.lru_cache(maxsize=1)
def pitch_set() -> tuple[float, ...]:
    """The frequencies (Hz, ascending) every tone is drawn from: the 25 equal-tempered pitches
    of the two octaves from A3 = 220 Hz through A4 = 440 Hz to A5 = 880 Hz."""
    return tuple(midi_to_hz(m) for m in range(LOWEST_MIDI, HIGHEST_MIDI + 1))


def _note_name(midi: int) -> str:
    return NOTE_NAMES[midi % 12]


def _article(word: str) -> str:
    return "an" if word[0] in "AEF" else "a"  # "an A", "an E", "an F" (eff)


def _envelope(n: int, sample_rate: int, decay_s: float) -> np.ndarray:
    """Attack ramp · exponential decay · release ramp, peak 1."""
    t = np.arange(n) / sample_rate
    attack = np.minimum(1.0, t / ATTACK_S)
    release = np.minimum(1.0, (n - 1 - np.arange(n)) / (RELEASE_S * sample_rate))
    return attack * np.exp(-t / decay_s) * np.clip(release, 0.0, 1.0)


def synthesize(
    kind: str, rng: np.random.Generator, length: int, sample_rate: int
) -> tuple[np.ndarray, float, str]:
    """One clip of ``kind`` drawn from ``rng``: (float32 samples, fundamental in Hz, caption).

    - ``note``: one sine at a pitch of :func:`pitch_set`; the fundamental is its frequency.
    - ``chord``: a major or minor triad (root, third, fifth) of three equal sines whose notes
      all lie in the pitch set; the fundamental is the root.
    - ``chirp``: a linear sweep from one pitch to another over the first third of the clip,
      then held at the second (so its spectrum peaks on a pitch: a sweep alone spreads its
      energy evenly between its ends); the fundamental is where it ends.

    Every sine starts at a random phase, the clip is shaped by a 10 ms attack, an exponential
    decay with a random time constant of 0.3 to 1.5 s and a 20 ms release, and its peak
    amplitude is drawn from 0.5 to 0.9.
    """
    n_pitches = HIGHEST_MIDI - LOWEST_MIDI + 1
    t = np.arange(length) / sample_rate
    if kind == "note":
        midi = LOWEST_MIDI + int(rng.integers(n_pitches))
        freq = midi_to_hz(midi)
        wave = np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
        caption = f"a note at {round(freq)} Hz"
    elif kind == "chord":
        quality = ("major", "minor")[int(rng.integers(2))]
        steps = TRIADS[quality]
        root = LOWEST_MIDI + int(rng.integers(n_pitches - steps[-1]))
        freq = midi_to_hz(root)
        phases = rng.uniform(0, 2 * np.pi, size=len(steps))
        wave = sum(np.sin(2 * np.pi * midi_to_hz(root + s) * t + p) for s, p in zip(steps, phases))
        name = _note_name(root)
        caption = f"{_article(name)} {name} {quality} chord"
    elif kind == "chirp":
        start, end = (LOWEST_MIDI + int(m) for m in rng.choice(n_pitches, size=2, replace=False))
        f0, freq = midi_to_hz(start), midi_to_hz(end)
        glide = max(1, round(GLIDE_SHARE * length))
        inst = f0 + (freq - f0) * np.minimum(np.arange(length) / glide, 1.0)  # instantaneous frequency
        phase = 2 * np.pi * np.concatenate([[0.0], np.cumsum(inst[:-1])]) / sample_rate
        wave = np.sin(phase + rng.uniform(0, 2 * np.pi))
        caption = f"a chirp from {round(f0)} Hz to {round(freq)} Hz"
    else:  # pragma: no cover - the dataset checks kinds
        raise ConfigError(f"tones: unknown kind {kind!r}; the kinds are {', '.join(KINDS)}.")
    clip = wave * _envelope(length, sample_rate, rng.uniform(*DECAY_S))
    clip *= rng.uniform(*AMPLITUDE) / max(float(np.abs(clip).max()), 1e-12)
    return clip.astype(np.float32), float(freq), caption


@register("dataset", "tones")
class Tones(Dataset):
    """Synthesised mono clips of notes, triads and chirps on equal-tempered pitches, with captions.

    Each clip (1×``length`` in [-1, 1], at ``sample_rate`` Hz) is one of ``kinds``, drawn
    with equal probability (see :func:`synthesize`): a sine ``note``, a major or minor
    ``chord``, or a ``chirp`` gliding from one pitch to another. Every frequency is one of
    :func:`pitch_set` (A3 to A5), so the training distribution has known spectral peaks that
    the ``tones_spectrum`` metric checks. Items are dicts with

    - ``x``: the clip, float32 (1, length), peak amplitude at most 0.9;
    - ``label``: the index of the clip's kind in ``kinds`` (``num_classes = len(kinds)``);
    - ``frequency``: the fundamental in Hz (float32): the note, the chord's root, or the
      pitch a chirp ends on;
    - ``caption``: e.g. ``"a note at 440 Hz"``, ``"an A minor chord"``,
      ``"a chirp from 262 Hz to 440 Hz"``.

    Item ``i`` depends only on (``seed``, ``i``), so nothing is stored.

    Args:
        sample_rate: samples per second (at least 2000, so that A5 = 880 Hz is below Nyquist).
        length: samples per clip (at least 256).
        size: number of items.
        seed: seed of the whole dataset (a non-negative integer).
        kinds: which kinds of clip to draw, a non-empty subset of note, chord, chirp.
    """

    def __init__(
        self,
        sample_rate: int = 8000,
        length: int = 4096,
        size: int = 20000,
        seed: int = 0,
        kinds: tuple[str, ...] = KINDS,
    ) -> None:
        check_int("tones", "sample_rate", sample_rate, minimum=2000)
        check_int("tones", "length", length, minimum=256)
        check_int("tones", "size", size, minimum=1)
        check_int("tones", "seed", seed, minimum=0)
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        unknown = [k for k in kinds if k not in KINDS]
        if not kinds or unknown or len(set(kinds)) != len(kinds):
            raise ConfigError(
                f"tones: kinds must be a non-empty list of distinct kinds from {list(KINDS)}; got {list(kinds)}"
                + (f" (unknown: {unknown})." if unknown else ".")
            )
        self.sample_rate, self.length, self.size, self.seed, self.kinds = sample_rate, length, size, seed, kinds
        self.data_shape: tuple[int, ...] = (1, length)
        self.data_range: tuple[float, float] | None = AUDIO_RANGE
        self.fields: tuple[str, ...] = ("x", "label", "frequency", "caption")
        self.num_classes: int | None = len(kinds)
        self.class_names: tuple[str, ...] | None = kinds

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index("tones", index, self.size)
        rng = np.random.default_rng([self.seed, i])
        label = int(rng.integers(len(self.kinds)))
        clip, freq, caption = synthesize(self.kinds[label], rng, self.length, self.sample_rate)
        return {
            "x": torch.from_numpy(clip)[None],
            "label": torch.tensor(label),
            "frequency": torch.tensor(freq, dtype=torch.float32),
            "caption": caption,
        }

    def __repr__(self) -> str:
        return (
            f"Tones(sample_rate={self.sample_rate}, length={self.length}, size={self.size}, "
            f"seed={self.seed}, kinds={list(self.kinds)})"
        )
