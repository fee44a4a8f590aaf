"""Pitch accuracy of generated ``tones`` clips, read from their magnitude spectra."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from unfog import register
from unfog.errors import ConfigError, DataError
from unfog_datasets.tones import pitch_set

MIN_LENGTH = 64
PAD_FACTOR = 4  # zero-padding of the FFT, for a finer grid under the peak interpolation
LOG_FLOOR = 1e-8  # added to normalised spectra before the logarithm


def hann_spectrum(clips: np.ndarray, n_fft: int | None = None) -> np.ndarray:
    """Magnitude spectra |rfft(w·x)| of clips (N, L) under a Hann window (Harris 1978),
    mean removed first (DC is inaudible and would otherwise dominate a biased clip)."""
    x = clips - clips.mean(axis=1, keepdims=True)
    window = np.hanning(x.shape[1])
    return np.abs(np.fft.rfft(x * window, n=n_fft, axis=1))


def peak_frequencies(clips: np.ndarray, sample_rate: int) -> np.ndarray:
    """The frequency (Hz) of the strongest spectral peak of each clip (N, L).

    The peak bin of the 4× zero-padded Hann spectrum is refined by fitting a parabola to the
    log magnitudes of it and its neighbours (quadratic interpolation of Smith & Serra 1987),
    which puts a pure tone's frequency within a fraction of a cent.
    """
    n_fft = PAD_FACTOR * clips.shape[1]
    log_mag = np.log(hann_spectrum(clips, n_fft) + 1e-12)
    log_mag[:, 0] = -np.inf  # never the DC bin
    k = np.clip(log_mag.argmax(axis=1), 1, log_mag.shape[1] - 2)
    rows = np.arange(len(clips))
    a, b, c = log_mag[rows, k - 1], log_mag[rows, k], log_mag[rows, k + 1]
    denom = a - 2 * b + c
    with np.errstate(invalid="ignore", divide="ignore"):
        offset = np.where(np.isfinite(denom) & (denom < 0), 0.5 * (a - c) / denom, 0.0)
    return (k + np.clip(offset, -0.5, 0.5)) * sample_rate / n_fft


def cents_to_nearest_pitch(freqs: np.ndarray) -> np.ndarray:
    """The distance in cents (1200·|log2(f / p)|) of each frequency to the nearest pitch of
    the ``tones`` pitch set; infinite for frequencies ≤ 0."""
    pitches = np.log2(np.asarray(pitch_set()))
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log2(np.asarray(freqs, dtype=np.float64))
    dist = 1200.0 * np.abs(logs[:, None] - pitches[None, :]).min(axis=1)
    return np.where(np.isfinite(dist), dist, np.inf)


def log_spectra(clips: np.ndarray) -> np.ndarray:
    """Each clip's Hann magnitude spectrum, normalised to sum 1 and log-scaled (N, L//2 + 1)."""
    mag = hann_spectrum(clips) + LOG_FLOOR
    return np.log(mag / mag.sum(axis=1, keepdims=True))


@register("metric", "tones_spectrum")
class TonesSpectrum:
    """Share of generated ``tones`` clips whose strongest spectral peak lies on a training pitch.

    For each generated clip (N×1×L in [-1, 1]) the strongest peak of its Hann-windowed,
    zero-padded magnitude spectrum is located with quadratic interpolation
    (:func:`peak_frequencies`) and compared with the pitch set of the ``tones`` dataset
    (:func:`unfog_datasets.tones.pitch_set`). ``compute()`` gives

    - ``peak_on_pitch``: share of clips whose peak lies within ``tolerance_cents`` of a
      pitch (silent and non-finite clips count as off pitch);
    - ``mean_cents_error``: mean distance in cents of the peak to the nearest pitch, over
      the clips that are neither silent nor non-finite (absent when there are none);
    - ``silent``: share of clips with RMS below ``silence_rms``;
    - ``spectral_distance`` (only when ``real`` clips were given): the mean absolute
      difference, over frequency bins, between the mean normalised log-magnitude spectrum
      of the generated and of the real clips (0 for identical distributions);
    - ``n``: the number of generated clips.

    On the dataset's own clips every peak is on pitch, within about a cent; for white noise
    the peak falls anywhere up to Nyquist, rarely near one of the pitches (see
    ``tests/unit/test_audio.py``). The default tolerance of 25 cents is a quarter tone:
    neighbouring pitches are 100 cents apart, so a tolerance of 50 would call every peak
    between A3 and A5 "on pitch". ``labels`` are ignored.

    Args:
        sample_rate: the clips' sample rate in Hz (the dataset's ``sample_rate``).
        tolerance_cents: how far from a pitch a peak may lie, in cents (100 = a semitone).
        silence_rms: clips with a root-mean-square amplitude below this are silent.
    """

    def __init__(self, sample_rate: int = 8000, tolerance_cents: float = 25.0, silence_rms: float = 0.01) -> None:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 2 * max(pitch_set()):
            raise ConfigError(
                f"tones_spectrum: sample_rate must be an integer above twice the highest pitch "
                f"({2 * max(pitch_set()):.0f} Hz); got {sample_rate!r}. Use the dataset's sample_rate."
            )
        if not 0.0 < tolerance_cents <= 600.0:
            raise ConfigError(f"tones_spectrum: tolerance_cents must lie in (0, 600]; got {tolerance_cents}.")
        if not silence_rms >= 0.0:
            raise ConfigError(f"tones_spectrum: silence_rms must be at least 0; got {silence_rms}.")
        self.sample_rate = sample_rate
        self.tolerance_cents = float(tolerance_cents)
        self.silence_rms = float(silence_rms)
        self.reset()

    def reset(self) -> None:
        """Forget every clip seen so far."""
        self._on_pitch: list[np.ndarray] = []
        self._silent: list[np.ndarray] = []
        self._cents: list[np.ndarray] = []
        self._spectra: dict[str, np.ndarray] = {}
        self._counts: dict[str, int] = {"generated": 0, "real": 0}
        self._length: int | None = None

    def peaks(self, clips: Tensor) -> Tensor:
        """The strongest peak's frequency in Hz of each clip (N×1×L), float64 (N,)."""
        return torch.from_numpy(peak_frequencies(self._check(clips, "clips", remember=False), self.sample_rate))

    def update(self, *, generated: Tensor, labels: Tensor | None = None, real: Tensor | None = None) -> None:
        """Score ``generated`` clips; add ``real`` ones (optional) for ``spectral_distance``."""
        x = self._check(generated, "generated")
        finite = np.isfinite(x).all(axis=1)
        x = np.where(finite[:, None], x, 0.0)
        silent = np.sqrt((x**2).mean(axis=1)) < self.silence_rms
        cents = cents_to_nearest_pitch(peak_frequencies(x, self.sample_rate))
        audible = finite & ~silent
        self._on_pitch.append(audible & (cents <= self.tolerance_cents))
        self._silent.append(finite & silent)
        self._cents.append(cents[audible])
        self._accumulate("generated", x[finite])
        if real is not None:
            self._accumulate("real", self._check(real, "real"))

    def compute(self) -> dict[str, float]:
        """``peak_on_pitch``, ``mean_cents_error``, ``silent``, ``spectral_distance`` and ``n``."""
        if not self._on_pitch:
            raise DataError("tones_spectrum: no clips to score; call update() with generated clips first.")
        on_pitch = np.concatenate(self._on_pitch)
        result = {"peak_on_pitch": float(on_pitch.mean())}
        cents = np.concatenate(self._cents)
        if len(cents):
            result["mean_cents_error"] = float(cents.mean())
        result["silent"] = float(np.concatenate(self._silent).mean())
        if self._counts["real"] and self._counts["generated"]:
            mean = {k: self._spectra[k] / self._counts[k] for k in ("generated", "real")}
            result["spectral_distance"] = float(np.abs(mean["generated"] - mean["real"]).mean())
        result["n"] = float(len(on_pitch))
        return result

    def _accumulate(self, which: str, x: np.ndarray) -> None:
        if not len(x):
            return
        total = log_spectra(x).sum(axis=0)
        self._spectra[which] = self._spectra[which] + total if which in self._spectra else total
        self._counts[which] += len(x)

    def _check(self, clips: Tensor, name: str, remember: bool = True) -> np.ndarray:
        x = torch.as_tensor(clips).detach().to("cpu", torch.float64)
        if x.ndim != 3 or x.shape[1] != 1 or x.shape[2] < MIN_LENGTH:
            raise DataError(
                f"tones_spectrum: {name} must be mono clips N×1×L with L ≥ {MIN_LENGTH} (as from the tones "
                f"dataset); got shape {tuple(x.shape)}."
            )
        if not remember:
            return x[:, 0].numpy()
        if self._length is None:
            self._length = int(x.shape[2])
        elif x.shape[2] != self._length:
            raise DataError(
                f"tones_spectrum: {name} clips have {x.shape[2]} samples but earlier ones had {self._length}; "
                "spectra of different lengths cannot be compared. Call reset() between lengths."
            )
        return x[:, 0].numpy()

    def __repr__(self) -> str:
        return (
            f"TonesSpectrum(sample_rate={self.sample_rate}, tolerance_cents={self.tolerance_cents}, "
            f"silence_rms={self.silence_rms})"
        )
