"""Sound end to end through the real CLI: train experiment=tones, sample, get WAV files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile
from _cli import run


def test_tones_train_sample_and_score_write_wav_files(tmp_path: Path) -> None:
    tiny = ["experiment=tones", "logger=csv", "trainer.max_steps=2", "dataset.length=512", "dataset.size=64",
            "data.batch_size=4", "backbone.channel_mult=[1,2]", "backbone.attention_levels=[1]",
            "sampling.num_samples=2", "sampling.every_n_steps=0", "sampler.steps=2"]
    run("train", *tiny, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    grid = sorted((tmp_path / "run" / "samples").glob("step_*/*.wav"))
    assert len(grid) == 2  # the training grid is written as sound too

    out = tmp_path / "sample"
    run("sample", f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "num_samples=3", "sampler.steps=2",
        "metric=tones_spectrum", f"output_dir={out}", cwd=tmp_path)
    wavs = sorted((out / "wav").glob("*.wav"))
    assert len(wavs) == 3
    clips = np.load(out / "samples.npz")["samples"]
    for k, path in enumerate(wavs):
        audio, rate = soundfile.read(path, dtype="float32")
        assert rate == 8000 and audio.shape == (512,)
        # 16-bit PCM, read back as k/32768
        np.testing.assert_allclose(audio, np.clip(clips[k, 0], -1, 1), atol=2 / 32767)
    record = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= record["results"]["tones_spectrum"]["peak_on_pitch"] <= 1.0
