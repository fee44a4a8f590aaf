"""Sound: the ``unet`` backbone on sequences (C, L) (the former ``unet1d``), the ``tones`` and
``audio_folder`` datasets, the ``tones_spectrum`` metric and ``unfog.audio.write_wavs`` (all offline, CPU, seconds)."""

from __future__ import annotations

import importlib.util
import re
import sys
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import unfog
import unfog_backbones.unet  # noqa: F401  (registers unet)
import unfog_datasets.audio_folder  # noqa: F401  (registers audio_folder)
import unfog_datasets.tones  # noqa: F401  (registers tones)
import unfog_metrics.tones_spectrum  # noqa: F401  (registers tones_spectrum)
from unfog.audio import is_audio, write_wavs
from unfog.errors import ConfigError, DataError
from unfog.protocols import Backbone, DatasetLike, Metric
from unfog_datasets.tones import pitch_set


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run the tiny networks on one thread: their operations take microseconds, and on a busy
    machine a second thread costs a wait for a core at every operation (a 100× slow-down)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ unet on (C, L)

TINY: dict[str, Any] = dict(
    channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2, kernel_size=3, groups=4,
    use_scale_shift_norm=True,
)
SEQ = (2, 32)
COND_DIM, CONTEXT_DIM, COND_CHANNELS = 6, 5, 3


def unet1d(data_shape: tuple[int, ...] = SEQ, **kw: Any) -> nn.Module:
    return unfog.create("backbone", "unet", data_shape=data_shape, **{**TINY, **kw})


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Add noise to every parameter so that zero-initialized layers no longer block anything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def inputs(routes: str = "", n: int = 3, shape: tuple[int, ...] = SEQ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=gen)
    t = torch.rand(n, generator=gen)
    cond = {}
    if "v" in routes:
        cond["vector"] = torch.randn(n, COND_DIM, generator=gen)
    if "t" in routes:
        cond["tokens"] = torch.randn(n, 4, CONTEXT_DIM, generator=gen)
    if "c" in routes:
        cond["concat"] = torch.randn(n, COND_CHANNELS, shape[1], generator=gen)
    return x, t, cond


ALL_ROUTES = dict(cond_dim=COND_DIM, context_dim=CONTEXT_DIM, cond_channels=COND_CHANNELS)


def test_unet_is_registered_for_sequences_also_under_its_former_name() -> None:
    entry = unfog.get("backbone", "unet")
    assert 2 in entry.obj.data_ranks
    assert unfog.get("backbone", "unet1d").obj is entry.obj  # old configs find it through `replaces`
    assert "unet1d" not in unfog.available("backbone")
    assert entry.obj.routes == ("vector", "tokens", "concat")
    assert re.search(r"20\d\d", entry.summary)  # cites a paper's year
    assert isinstance(unet1d(), Backbone)


@pytest.mark.parametrize(
    "kw, routes",
    [
        (dict(), ""),
        (ALL_ROUTES, "vtc"),
        (dict(channel_mult=(1, 2, 2), attention_levels=(0, 2), kernel_size=5, num_res_blocks=2), ""),
    ],
)
def test_unet1d_keeps_the_shape_and_starts_at_zero(kw: dict[str, Any], routes: str) -> None:
    model = unet1d(**kw)
    x, t, cond = inputs(routes)
    out = model(x, t, cond)
    assert out.shape == x.shape
    assert torch.all(out == 0)  # zero-init output layer


@pytest.mark.parametrize("route", ["vector", "tokens", "concat", "time"])
def test_unet1d_every_route_reaches_the_output(route: str) -> None:
    model = perturb(unet1d(**ALL_ROUTES)).eval()
    x, t, cond = inputs("vtc")
    base = model(x, t, cond)
    if route == "time":
        changed = model(x, 1.0 - t, cond)
    else:  # random, not constant: the tokens' LayerNorm would remove a constant shift
        shift = torch.randn(cond[route].shape, generator=torch.Generator().manual_seed(2))
        other = {**cond, route: cond[route] + shift}
        changed = model(x, t, other)
    assert (base - changed).abs().max() > 1e-3


def test_unet1d_every_parameter_gets_a_gradient() -> None:
    model = perturb(unet1d(dropout=0.1, **ALL_ROUTES))
    x, t, cond = inputs("vtc")
    model(x, t, cond).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_unet1d_cross_attention_follows_every_self_attention() -> None:
    names = [type(m).__name__ for m in unet1d(context_dim=CONTEXT_DIM).modules()]
    # level 1 attends after 1 block down and 2 up, plus the middle
    assert names.count("AttentionBlock") == names.count("CrossAttentionBlock") == 4
    assert "CrossAttentionBlock" not in [type(m).__name__ for m in unet1d().modules()]


def test_unet1d_checks_the_conditioning_routes() -> None:
    x, t, _ = inputs()
    with pytest.raises(ConfigError, match="context_dim=5.*'tokens'"):
        unet1d(context_dim=CONTEXT_DIM)(x, t, {})
    with pytest.raises(ConfigError, match=r"'concat' conditioning must have shape \(B, 3, 32\)"):
        unet1d(cond_channels=COND_CHANNELS)(x, t, {"concat": torch.zeros(3, COND_CHANNELS, 16)})
    with pytest.raises(ConfigError, match="unconditional"):
        unet1d()(x, t, {"vector": torch.zeros(3, COND_DIM)})


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(data_shape=(8,)), r"data_shape must be \(C, L\) for sequences"),
        (dict(attention_levels=(2,)), r"levels are \[0, 1\]"),
        (dict(channels=6), r"divisible by groups=4.*not: \[6\]"),
        (dict(num_heads=3), "num_heads=3"),
        (dict(kernel_size=4), "kernel_size must be a positive odd"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(cond_dim=-1), "cond_dim"),
        (dict(context_dim=-2), "context_dim"),
    ],
)
def test_unet1d_refuses_bad_configurations(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        unet1d(**kw)


@pytest.mark.parametrize("length", [36, 1000, 7])
def test_unet1d_takes_any_length(length: int) -> None:
    """Lengths that 2**(levels-1) does not divide are padded at the end and cropped back."""
    model = perturb(unet1d(data_shape=(2, length), channel_mult=(1, 2, 2, 2))).eval()
    x, t, cond = inputs(shape=(2, length))
    assert model(x, t, cond).shape == x.shape


# -------------------------------------------------------------------------------------- tones


@pytest.fixture(scope="module")
def tones() -> Any:
    return unfog.create("dataset", "tones", size=1000, seed=3)


@pytest.fixture(scope="module")
def tone_items(tones) -> list[dict]:
    return [tones[i] for i in range(90)]


def test_pitch_set_is_two_equal_tempered_octaves_around_a4() -> None:
    pitches = np.array(pitch_set())
    assert len(pitches) == 25 and pitches[0] == pytest.approx(220.0) and pitches[-1] == pytest.approx(880.0)
    assert 440.0 in [round(p, 6) for p in pitches]
    assert np.allclose(pitches[1:] / pitches[:-1], 2 ** (1 / 12))


def test_tones_items_match_the_metadata(tones, tone_items) -> None:
    assert isinstance(tones, DatasetLike)
    assert tones.data_shape == (1, 4096) and tones.data_range == (-1.0, 1.0) and len(tones) == 1000
    assert tones.fields == ("x", "label", "frequency", "caption")
    assert tones.num_classes == 3 and tones.class_names == ("note", "chord", "chirp")
    for item in tone_items:
        assert tuple(item) == tones.fields
        x = item["x"]
        assert x.dtype == torch.float32 and x.shape == (1, 4096) and torch.isfinite(x).all()
        assert 0.45 < float(x.abs().max()) <= 0.9 and abs(float(x[0, 0])) < 0.05  # attack from silence
        assert item["label"].dtype == torch.long and 0 <= int(item["label"]) < 3
        assert item["frequency"].dtype == torch.float32
        assert min(abs(float(item["frequency"]) - p) for p in pitch_set()) < 1e-3
    assert {int(i["label"]) for i in tone_items} == {0, 1, 2}


def test_tones_are_deterministic_per_index_and_seed(tones) -> None:
    again = unfog.create("dataset", "tones", size=1000, seed=3)
    for i in (0, 17, -1):
        a, b = tones[i], again[i]
        assert torch.equal(a["x"], b["x"]) and a["caption"] == b["caption"]
    assert not torch.equal(tones[5]["x"], unfog.create("dataset", "tones", size=1000, seed=4)[5]["x"])
    with pytest.raises(IndexError):
        tones[1000]


def test_tones_captions_name_what_is_heard(tone_items) -> None:
    patterns = [r"a note at \d+ Hz", r"an? [A-G]( sharp)? (major|minor) chord", r"a chirp from \d+ Hz to \d+ Hz"]
    for item in tone_items:
        label, caption, freq = int(item["label"]), item["caption"], float(item["frequency"])
        assert re.fullmatch(patterns[label], caption), caption
        if label != 1:
            assert caption.endswith(f"{round(freq)} Hz")


def test_tones_spectral_peak_is_at_the_stated_frequency(tone_items) -> None:
    x = torch.stack([i["x"] for i in tone_items])
    peaks = unfog.create("metric", "tones_spectrum").peaks(x).numpy()
    for item, peak in zip(tone_items, peaks):
        f = float(item["frequency"])
        if int(item["label"]) == 1:  # a chord peaks at one of its three notes
            candidates = [f * 2 ** (s / 12) for s in (0, 3, 4, 7)]
        else:
            candidates = [f]
        assert min(abs(1200 * np.log2(peak / c)) for c in candidates) < 5.0, (item["caption"], peak)


def test_tones_kinds_and_collation() -> None:
    ds = unfog.create("dataset", "tones", size=50, length=512, kinds=("chord",))
    assert ds.num_classes == 1 and ds.class_names == ("chord",) and ds.data_shape == (1, 512)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["x"].shape == (4, 1, 512) and batch["frequency"].shape == (4,)
    assert all("chord" in c for c in batch["caption"]) and batch["label"].tolist() == [0] * 4
    for bad in ((), ("note", "drum"), ("note", "note")):
        with pytest.raises(ConfigError, match="kinds must be"):
            unfog.create("dataset", "tones", kinds=bad)
    with pytest.raises(ConfigError, match="sample_rate"):
        unfog.create("dataset", "tones", sample_rate=1000)


# ------------------------------------------------------------------------------ tones_spectrum


def noise(n: int, length: int = 4096, seed: int = 0, scale: float = 0.5) -> torch.Tensor:
    return scale * torch.randn(n, 1, length, generator=torch.Generator().manual_seed(seed)).clamp(-2, 2)


def test_tones_spectrum_scores_the_dataset_perfectly(tone_items) -> None:
    metric = unfog.create("metric", "tones_spectrum")
    assert isinstance(metric, Metric)
    x = torch.stack([i["x"] for i in tone_items])
    metric.update(generated=x[:45], real=x[45:])
    metric.update(generated=x[45:], real=x[:45])
    result = metric.compute()
    assert result["peak_on_pitch"] == 1.0 and result["silent"] == 0.0 and result["n"] == 90.0
    assert result["mean_cents_error"] < 1.0
    assert result["spectral_distance"] == pytest.approx(0.0, abs=1e-9)  # same clips on both sides


def test_tones_spectrum_scores_white_noise_low(tone_items) -> None:
    metric = unfog.create("metric", "tones_spectrum")
    metric.update(generated=noise(200), real=torch.stack([i["x"] for i in tone_items]))
    result = metric.compute()
    assert result["peak_on_pitch"] < 0.25
    assert result["mean_cents_error"] > 200.0
    assert result["spectral_distance"] > 1.0
    metric.reset()
    with pytest.raises(DataError, match="no clips"):
        metric.compute()


def test_tones_spectrum_detects_silence_and_broken_clips() -> None:
    metric = unfog.create("metric", "tones_spectrum")
    quiet = torch.cat([torch.zeros(2, 1, 1024), noise(2, 1024, scale=0.001)])
    broken = torch.full((1, 1, 1024), float("nan"))
    metric.update(generated=torch.cat([quiet, broken]))
    result = metric.compute()
    assert result == {"peak_on_pitch": 0.0, "silent": 0.8, "n": 5.0}  # no audible clip: no cents error
    with pytest.raises(DataError, match="N×1×L"):
        metric.update(generated=torch.zeros(2, 2, 1024))
    with pytest.raises(DataError, match="1024"):
        metric.update(generated=torch.zeros(2, 1, 2048))


def test_tones_spectrum_reads_a_sine_within_a_cent() -> None:
    t = torch.arange(4096, dtype=torch.float64) / 8000
    freqs = torch.tensor([220.0, 300.0, 466.1638, 877.0], dtype=torch.float64)
    clips = (0.5 * torch.sin(2 * torch.pi * freqs[:, None] * t + 0.3))[:, None]
    metric = unfog.create("metric", "tones_spectrum")
    assert torch.allclose(metric.peaks(clips), freqs, rtol=2 ** (1 / 1200) - 1)
    assert metric.peaks(clips[..., :1000]).shape == (4,)  # peaks() does not fix the length of update()
    metric.update(generated=clips)
    # 300 Hz is 37 cents above D4 (293.7 Hz): off pitch; 877 Hz is 6 cents below A5: on pitch
    assert metric.compute()["peak_on_pitch"] == 0.75
    loose = unfog.create("metric", "tones_spectrum", tolerance_cents=50.0)
    loose.update(generated=clips)
    assert loose.compute()["peak_on_pitch"] == 1.0


def test_tones_spectrum_refuses_bad_settings() -> None:
    for kw in (dict(sample_rate=1000), dict(tolerance_cents=0.0), dict(silence_rms=-1.0)):
        with pytest.raises(ConfigError):
            unfog.create("metric", "tones_spectrum", **kw)


# ------------------------------------------------------------------------------------ write_wavs


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(channels, frames) int16 samples and the sample rate of a 16-bit WAV file."""
    with wave.open(str(path), "rb") as f:
        assert f.getsampwidth() == 2
        data = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
        return data.reshape(-1, f.getnchannels()).T, f.getframerate()


def test_write_wavs_round_trips_through_the_wave_module(tmp_path: Path) -> None:
    x = torch.tensor([[[0.0, 0.5, -0.5, 1.5, -2.0, float("nan")], [1.0, -1.0, 0.25, 0.0, 0.0, 0.0]]])
    x = torch.cat([x, -x])
    paths = write_wavs(x, 8000, tmp_path / "wavs", prefix="clip")
    assert [p.name for p in paths] == ["clip_0000.wav", "clip_0001.wav"]
    data, rate = read_wav(paths[0])
    assert rate == 8000 and data.shape == (2, 6)
    assert data.tolist() == [[0, 16384, -16384, 32767, -32767, 0], [32767, -32767, 8192, 0, 0, 0]]
    assert read_wav(paths[1])[0][0, :3].tolist() == [0, -16384, 16384]
    mono = write_wavs(torch.zeros(3, 10), 16000, tmp_path, prefix="m")
    assert len(mono) == 3 and read_wav(mono[2])[0].shape == (1, 10)
    with pytest.raises(ValueError, match="shape"):
        write_wavs(torch.zeros(10), 8000, tmp_path)
    with pytest.raises(ValueError, match="sample_rate"):
        write_wavs(torch.zeros(1, 10), 0, tmp_path)


def test_is_audio_means_rank_two() -> None:
    assert is_audio((1, 4096)) and is_audio([2, 16])
    assert not is_audio((3, 8, 8)) and not is_audio((2,))


# ---------------------------------------------------------------------------------- audio_folder

needs_soundfile = pytest.mark.skipif(
    importlib.util.find_spec("soundfile") is None, reason="audio_folder needs soundfile (pip install 'unfog[audio]')"
)
SOURCE_RATE = 11025


def sine(freq: float, seconds: float, rate: int = SOURCE_RATE, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(round(seconds * rate), dtype=torch.float64) / rate
    return amp * torch.sin(2 * torch.pi * freq * t)


@pytest.fixture
def sound_root(tmp_path: Path) -> Path:
    """root/high/*.wav (1000 Hz, stereo, 0.5 s) and root/low/*.wav (300 Hz, mono, 0.1 s) at 11025 Hz."""
    root = tmp_path / "sounds"
    left, right = sine(1000, 0.5, amp=0.6), sine(1000, 0.5, amp=0.2)
    write_wavs(torch.stack([torch.stack([left, right])] * 2), SOURCE_RATE, root / "high", prefix="h")
    write_wavs(sine(300, 0.1)[None, None], SOURCE_RATE, root / "low", prefix="l")
    return root


def audio_folder(root: Path, **kw: Any) -> Any:
    return unfog.create("dataset", "audio_folder", root=str(root), **{"sample_rate": 8000, "length": 1024, **kw})


@needs_soundfile
def test_audio_folder_resamples_crops_and_labels(sound_root: Path) -> None:
    ds = audio_folder(sound_root)
    assert isinstance(ds, DatasetLike) and len(ds) == 3
    assert ds.data_shape == (1, 1024) and ds.data_range == (-1.0, 1.0)
    assert ds.fields == ("x", "label") and ds.class_names == ("high", "low") and ds.num_classes == 2
    assert [int(ds[i]["label"]) for i in range(3)] == [0, 0, 1]
    x = ds[0]["x"]
    assert x.dtype == torch.float32 and x.shape == (1, 1024)
    assert float(x.abs().max()) == pytest.approx(0.4, abs=0.01)  # (0.6 + 0.2) / 2: mixed down to mono
    peak = float(unfog.create("metric", "tones_spectrum").peaks(x[None])[0])
    assert peak == pytest.approx(1000.0, rel=0.003)  # still 1000 Hz at the new rate
    short = ds[2]["x"][0]  # 0.1 s at 8 kHz = 800 samples, then zero padding
    assert float(short[:790].abs().max()) > 0.4 and torch.all(short[800:] == 0)


@needs_soundfile
def test_audio_folder_crops_are_deterministic_per_index(sound_root: Path) -> None:
    ds = audio_folder(sound_root)
    assert torch.equal(ds[0]["x"], ds[0]["x"])
    assert torch.equal(ds[0]["x"], audio_folder(sound_root)[0]["x"])
    starts = {tuple(audio_folder(sound_root, seed=s)[0]["x"][0, :4].tolist()) for s in range(4)}
    assert len(starts) > 1  # another seed crops elsewhere


@needs_soundfile
def test_audio_folder_window_equals_resampling_the_whole_file(tmp_path: Path) -> None:
    import soundfile
    from scipy.signal import resample_poly

    clip = noise(1, SOURCE_RATE, scale=0.3).double().clamp(-1, 1)  # 1 s, stereo below: nothing repeats
    write_wavs(torch.cat([clip, -0.5 * clip], dim=1), SOURCE_RATE, tmp_path)
    ds = audio_folder(tmp_path, channels=2)
    data, _ = soundfile.read(ds.files[0], dtype="float32", always_2d=True)
    whole = resample_poly(data.astype(np.float64), 320, 441, axis=0).T  # 11025 -> 8000 Hz
    assert whole.shape == (2, 8000)
    x = ds[0]["x"].numpy()
    assert x.shape == (2, 1024)
    errors = [np.abs(whole[:, s:s + 1024] - x).max() for s in range(8000 - 1023)]
    start = int(np.argmin(errors))
    assert errors[start] < 1e-5 and 0 < start  # a window decoded alone equals the whole file's samples
    assert sorted(errors)[1] > 0.01


@needs_soundfile
def test_audio_folder_channels_and_unlabelled_roots(tmp_path: Path) -> None:
    write_wavs(sine(440, 0.2)[None, None], SOURCE_RATE, tmp_path, prefix="flat")
    ds = audio_folder(tmp_path, channels=2, sample_rate=SOURCE_RATE, length=512)
    assert ds.fields == ("x",) and ds.num_classes is None and ds.class_names is None
    x = ds[0]["x"]
    assert x.shape == (2, 512) and torch.equal(x[0], x[1])  # a mono file fills both channels


@needs_soundfile
def test_audio_folder_bad_files(sound_root: Path) -> None:
    bad = sound_root / "low" / "broken.wav"
    bad.write_bytes(b"RIFF not really a wav file")
    ds = audio_folder(sound_root)
    with pytest.raises(DataError, match=re.escape(str(bad))):
        ds[2]
    with pytest.warns(RuntimeWarning, match="skipped 1 of 4"):
        ds = audio_folder(sound_root, skip_bad_files=True)
    assert len(ds) == 3 and len(ds.skipped) == 1 and str(bad) in ds.skipped[0]


@needs_soundfile
def test_audio_folder_refuses_missing_or_empty_roots(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):  # the same class as image_folder's
        audio_folder(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("no sound here")
    with pytest.raises(DataError, match=r"no sound files found under .*\.wav, \.flac"):
        audio_folder(tmp_path)


def test_audio_folder_without_soundfile_says_how_to_install(sound_root: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "soundfile", None)  # makes `import soundfile` fail
    with pytest.raises(ConfigError, match=re.escape("pip install 'unfog[audio]'")):
        audio_folder(sound_root)
