"""Checkpoints are untrusted input: every kind of bad file is one CheckpointError that names the
file and says what to do, nothing in a file runs as code, and an old checkpoint still loads."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from unfog.checkpoints import read_checkpoint
from unfog.errors import CheckpointError
from unfog.pipeline import Pipeline

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "old_checkpoints"
GOOD = FIXTURES / "digits_unet.ckpt"


class RunsCode:
    """A pickle that would call a function of the os module when loaded."""

    def __reduce__(self):  # noqa: D105
        return (os.getcwd, ())


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a piece of the message)."""
    good = GOOD.read_bytes()
    files = {
        "missing": (tmp / "nothing.ckpt", "does not exist"),
        "empty": (tmp / "empty.ckpt", "is empty"),
        "random bytes": (tmp / "random.ckpt", "is not a PyTorch checkpoint"),
        "truncated": (tmp / "truncated.ckpt", "is damaged or incomplete"),
        "code in the pickle": (tmp / "code.ckpt", "was refused"),
        "another program's checkpoint": (tmp / "other.ckpt", "not an unfog training checkpoint"),
        "a bare tensor": (tmp / "tensor.pt", "not a training checkpoint"),
        "a folder that is no export": (tmp / "folder", "not an unfog export"),
        "text": (tmp / "notes.ckpt", "is not a PyTorch checkpoint"),
    }
    files["empty"][0].write_bytes(b"")
    files["random bytes"][0].write_bytes(np.random.default_rng(0).bytes(4096))
    files["truncated"][0].write_bytes(good[: len(good) // 2])
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": RunsCode()}, files["code in the pickle"][0])
    torch.save({"state_dict": {"conv.weight": torch.zeros(2, 2)}, "epoch": 3, "global_step": 9},
               files["another program's checkpoint"][0])
    torch.save(torch.zeros(3), files["a bare tensor"][0])
    files["a folder that is no export"][0].mkdir()
    files["text"][0].write_text("model: unet\nsteps: 100\n")
    return files


def test_every_bad_file_is_one_clear_error(tmp_path: Path) -> None:
    for name, (path, says) in _bad_files(tmp_path).items():
        with pytest.raises(CheckpointError) as err:
            Pipeline.load(path)
        message = str(err.value)
        assert says in message and str(path.name) in message, (name, message)
        assert "\n" not in message, (name, message)


def test_a_pickle_with_code_is_never_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = []
    path = tmp_path / "code.ckpt"
    torch.save({"unfog": {"config": {}}, "state_dict": {}, "x": RunsCode()}, path)
    monkeypatch.setattr(os, "getcwd", lambda: ran.append(True) or "/")
    with pytest.raises(CheckpointError, match="never runs code"):
        read_checkpoint(path)
    assert not ran


def test_resuming_from_a_bad_file_fails_before_training(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from unfog.commands import conf_dir
    from unfog.commands.train import train
    from unfog.config import register_configs

    bad = tmp_path / "last.ckpt"
    bad.write_bytes(np.random.default_rng(1).bytes(1000))
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer=debug", "logger=csv", f"ckpt_path={bad}"])
    with pytest.raises(CheckpointError, match=r"ckpt_path=.*last.ckpt is not a PyTorch checkpoint"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _edited(tmp: Path, edit) -> Path:
    ckpt = torch.load(GOOD, weights_only=True)
    edit(ckpt["unfog"])
    path = tmp / "edited.ckpt"
    torch.save(ckpt, path)
    return path


def test_a_checkpoint_of_a_plugin_that_is_not_installed_names_it_and_its_version(tmp_path: Path) -> None:
    def edit(meta):
        meta["config"]["backbone"]["_name_"] = "fancy_unet"
        meta["versions"]["unfog-fancy"] = "2.0.1"

    with pytest.raises(CheckpointError) as err:
        Pipeline.load(_edited(tmp_path, edit))
    message = str(err.value)
    assert "Unknown backbone 'fancy_unet'" in message and "unfog-fancy 2.0.1 (installed: unknown)" in message


def test_a_checkpoint_of_a_newer_unfog_names_the_versions(tmp_path: Path) -> None:
    def edit(meta):
        meta["config"]["backbone"]["new_option"] = 3
        meta["versions"]["unfog"] = "9.9.9"

    with pytest.raises(CheckpointError) as err:
        Pipeline.load(_edited(tmp_path, edit))
    message = str(err.value)
    assert "no parameter 'new_option'" in message and "unfog 9.9.9 (installed: " in message


def test_an_export_whose_weights_changed_or_whose_record_is_broken_is_refused(tmp_path: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(FIXTURES / "digits_export", export)
    weights = export / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        Pipeline.load(export)
    (export / "unfog.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        Pipeline.load(export)
    (export / "unfog.json").write_text(json.dumps({"weights": "model.safetensors"}))
    weights.unlink()
    with pytest.raises(CheckpointError, match="is missing; the export .* is incomplete"):
        Pipeline.load(export)


@pytest.mark.parametrize("name, npz, guidance", [
    ("digits_unet.ckpt", "digits_unet_samples.npz", 2.0),      # unet with attention_resolutions, class_label
    ("tones_unet1d.ckpt", "tones_unet1d_samples.npz", 1.0),    # the former unet1d backbone
    ("digits_export", "digits_export_samples.npz", 2.0),       # a format=safetensors export folder
])
def test_checkpoints_of_an_earlier_unfog_load_and_draw_the_same_samples(name: str, npz: str, guidance: float) -> None:
    """Written at commit 74e803d with the commands in tests/fixtures/old_checkpoints/README.md."""
    import unfog
    from unfog.schemas import SamplingSettings

    pipeline = Pipeline.load(FIXTURES / name)
    assert pipeline.config["backbone"]["_name_"] == "unet" and "attention_levels" in pipeline.config["backbone"]
    expected = np.load(FIXTURES / npz)
    values = {"label": torch.as_tensor(expected["labels"])} if "labels" in expected.files else None
    x = pipeline.generate(unfog.create("sampler", "ddim", steps=5), len(expected["samples"]), values,
                          SamplingSettings(guidance=guidance))
    # equal to float32 rounding: a matrix product may sum in another order with another thread count
    np.testing.assert_allclose(x.numpy(), expected["samples"], rtol=1e-5, atol=1e-6)
