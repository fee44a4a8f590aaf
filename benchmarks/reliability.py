"""Bad input, tried as a hostile user and a flaky cluster would: every case runs the real
``unfog`` command (or, for a full disk, the real checkpoint writer), and the message it printed
is written into docs/reliability.md with its exit status and the test that pins it.

    python benchmarks/reliability.py            # about 3 minutes on 2 CPU cores; rewrites docs/reliability.md
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["backbone=unet_tiny", "conditioner=class_label", "trainer=debug", "logger=csv", "data.batch_size=16",
        "sampling.num_samples=0", "sampler.steps=3"]

S, C = "tests/unit/test_settings.py", "tests/unit/test_checkpoints.py"
INT, D = "tests/integration/test_interruptions.py", "tests/integration/test_defaults.py"


def cases(work: Path, ckpt: Path) -> list[tuple[str, str, list[str], str]]:
    """(group, what was tried, the unfog arguments, the test that pins it)."""
    files = work / "files"
    return [
        ("config", "a word where a number goes", ["train", "data.batch_size=abc"], S),
        ("config", "a batch of zero", ["train", "data.batch_size=0"], S),
        ("config", "a negative learning rate", ["train", "optim.lr=-1"], S),
        ("config", "AdamW betas out of range", ["train", "optim.betas=[0.9,1.5]"], S),
        ("config", "the trainer's max_steps as a word", ["train", "trainer.max_steps=abc"], S),
        ("config", "negative max_steps", ["train", "trainer.max_steps=-5"], S),
        ("config", "a precision Lightning does not have", ["train", "trainer.precision=17"], S),
        ("config", "guidance rescale out of [0, 1] (was accepted, then failed at the first grid)",
         ["train", "sampling.guidance_rescale=7"], S),
        ("config", "negative guidance", ["train", "sampling.guidance=-2"], S),
        ("config", "an inverted guidance interval", ["train", "sampling.guidance_interval=[5,1]"], S),
        ("config", "a negative number of sampler steps", ["train", "sampler.steps=-3", "trainer.max_steps=1"],
         S),
        ("config", "a misspelt component", ["train", "sampler=ddimm"], "tests/integration/test_cli.py"),
        ("config", "a misspelt field", ["train", "backbone=unet_tiny", "backbone.stepz=3"],
         "tests/unit/test_config.py"),
        ("config", "a key no command has", ["train", "+surprise=1"], S),
        ("config", "settings for a conditioner auto did not choose", ["train", "conditioners.class_label.dropout=0.2"],
         D),
        ("config", "an unknown command", ["trian"], "tests/integration/test_cli.py"),
        ("checkpoint", "a checkpoint that does not exist", ["sample", f"checkpoint={work / 'nope.ckpt'}"], C),
        ("checkpoint", "an empty file", ["sample", f"checkpoint={files / 'empty.ckpt'}"], C),
        ("checkpoint", "random bytes", ["sample", f"checkpoint={files / 'random.ckpt'}"], C),
        ("checkpoint", "a checkpoint cut in half", ["sample", f"checkpoint={files / 'truncated.ckpt'}"], C),
        ("checkpoint", "a pickle that would run code", ["sample", f"checkpoint={files / 'code.ckpt'}"], C),
        ("checkpoint", "another program's .ckpt", ["sample", f"checkpoint={files / 'other.ckpt'}"], C),
        ("checkpoint", "a checkpoint of a plugin that is not installed",
         ["sample", f"checkpoint={files / 'plugin.ckpt'}"], C),
        ("checkpoint", "a checkpoint of a newer unfog (an option this one lacks)",
         ["sample", f"checkpoint={files / 'newer.ckpt'}"], C),
        ("checkpoint", "an export whose weights were changed", ["sample", f"checkpoint={files / 'export'}"], C),
        ("checkpoint", "resuming from random bytes", ["train", *TINY, f"ckpt_path={files / 'random.ckpt'}"], C),
        ("checkpoint", "resuming a run that already reached max_steps (exited 1 before)",
         ["train", *TINY, "trainer.max_steps=2", f"ckpt_path={ckpt}"], INT),
        ("data", "a folder that does not exist", ["train", "dataset=image_folder", "dataset.root=/no/such/folder"],
         "tests/unit/test_folder_datasets.py"),
        ("data", "a folder with an unreadable image",
         ["train", "dataset=image_folder", f"dataset.root={files / 'photos'}", "dataset.size=8", "trainer=debug",
          "logger=csv", "sampling.num_samples=0"], "tests/unit/test_folder_datasets.py"),
        ("sampling", "guidance for a conditioner the model lacks",
         ["sample", f"checkpoint={ckpt}", "guidance={text: 2}"], "tests/unit/test_pipeline.py"),
        ("sampling", "a prompt for a class-conditional model", ["sample", f"checkpoint={ckpt}", "prompt=a cat"],
         "tests/unit/test_pipeline.py"),
        ("sampling", "a negative label", ["sample", f"checkpoint={ckpt}", "labels=[1,-2]"], S),
        ("sampling", "evaluate with no metric", ["evaluate", f"checkpoint={ckpt}", "num_samples=4"],
         "tests/integration/test_evaluation.py"),
        ("sampling", "a diffusers export of a model diffusers cannot load",
         ["export", f"checkpoint={ckpt}", "format=diffusers", f"output_dir={work / 'out'}"],
         "tests/integration/test_export.py"),
    ]


def make_files(work: Path, ckpt: Path) -> None:
    from PIL import Image

    files = work / "files"
    files.mkdir(parents=True)
    good = ckpt.read_bytes()
    (files / "empty.ckpt").write_bytes(b"")
    (files / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    (files / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    torch.save({"state_dict": {}, "x": _RunsCode()}, files / "code.ckpt")
    torch.save({"state_dict": {"conv.weight": torch.zeros(2, 2)}, "epoch": 3}, files / "other.ckpt")
    for name, edit in (("plugin", _plugin), ("newer", _newer)):
        data = torch.load(ckpt, weights_only=True)
        edit(data["unfog"])
        torch.save(data, files / f"{name}.ckpt")
    subprocess.run([*_unfog(), "export", f"checkpoint={ckpt}", f"output_dir={files / 'export'}"], check=True,
                   capture_output=True, cwd=work)
    weights = files / "export" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    (files / "photos").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(files / "photos" / f"{i}.png")
    (files / "photos" / "broken.png").write_bytes(b"not a png")


class _RunsCode:
    def __reduce__(self) -> Any:
        return (os.system, ("echo this would run",))


def _plugin(meta: dict[str, Any]) -> None:
    meta["config"]["backbone"]["_name_"] = "fancy_unet"
    meta["versions"]["unfog-fancy"] = "2.0.1"


def _newer(meta: dict[str, Any]) -> None:
    meta["config"]["backbone"]["new_option"] = 3
    meta["versions"]["unfog"] = "9.9.9"


def _unfog() -> list[str]:
    exe = shutil.which("unfog", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "unfog.cli"]


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}


def attempt(args: list[str], cwd: Path) -> tuple[int, str]:
    proc = subprocess.run([*_unfog(), *args], cwd=cwd, capture_output=True, text=True, env=_env(), timeout=600)
    lines = [ln for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.startswith("unfog:")]
    errors = [ln for ln in lines if ln.startswith("unfog: error:")]
    traceback = "Traceback" in proc.stderr
    shown = (errors or lines or [proc.stderr.strip()[-300:]])[-1]
    return proc.returncode, ("TRACEBACK: " if traceback else "") + shown


def signal_case(work: Path, sig: int) -> tuple[int, str]:
    run_dir = work / f"signal-{sig}"
    proc = subprocess.Popen([*_unfog(), "train", *TINY, "trainer.max_steps=100000", "checkpoint.every_n_steps=5",
                             f"hydra.run.dir={run_dir}"], cwd=work, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,  # SIGINT delivered, as in a terminal:
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    lines = [ln for ln in err.splitlines() if ln.startswith("unfog: stopped")]
    return proc.returncode, lines[-1] if lines else err.strip()[-300:]


def full_disk_case(work: Path) -> tuple[int, str]:
    """The real writer with a disk that fills up half way through the second checkpoint."""
    from unfog.callbacks import AtomicCheckpointIO
    from unfog.errors import CheckpointError

    path, io, real = work / "disk" / "last.ckpt", AtomicCheckpointIO(), torch.save
    io.save_checkpoint({"global_step": 500, "w": torch.zeros(10)}, path)

    def full(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    torch.save = full
    try:
        io.save_checkpoint({"global_step": 1000, "w": torch.ones(10)}, path)
    except CheckpointError as exc:
        return 1, f"unfog: error: {str(exc).replace(str(work), 'RUN')}"
    finally:
        torch.save = real
    return 0, "no error"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="unfog-reliability-"))
    try:
        subprocess.run([*_unfog(), "train", *TINY, "trainer.max_steps=2", f"hydra.run.dir={work / 'trained'}"],
                       cwd=work, env=_env(), check=True, capture_output=True)
        ckpt = work / "trained" / "checkpoints" / "last.ckpt"
        make_files(work, ckpt)
        rows = []
        for group, what, argv, test in cases(work, ckpt):
            status, message = attempt(argv, work)
            rows.append((group, what, "unfog " + " ".join(argv), status, message, test))
            print(f"[{status}] {what}: {message}", flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            status, message = signal_case(work, sig)
            rows.append(("interruption", f"{signal.Signals(sig).name} while training",
                         f"unfog train ... then kill -{signal.Signals(sig).name[3:]}", status, message, INT))
        status, message = full_disk_case(work)
        rows.append(("interruption", "a full disk while a checkpoint is written", "(the checkpoint writer)",
                     status, message, INT))
        args.out.write_text(render(rows, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(rows: list[tuple[str, str, str, int, str, str]], work: Path) -> str:
    lines = [
        "# Reliability: bad input and interruptions", "",
        "Every case below was tried with the real `unfog` command (paths shortened to `RUN`); the message",
        "is what it printed, one line, with no traceback, before any training or sampling started",
        "(interruptions: after the step where training stopped). Regenerate with",
        "`python benchmarks/reliability.py`; each case is pinned by the test named beside it.", "",
        "| kind | tried | exit | message | test |", "|---|---|---|---|---|",
    ]
    for group, what, command, status, message, test in rows:
        message = message.replace(str(work), "RUN").replace("|", "\\|")
        command = command.replace(str(work), "RUN").replace("|", "\\|")
        lines.append(f"| {group} | {what}: `{command}` | {status} | {message} | `{test}` |")
    lines += [
        "", "## What a run keeps when it is interrupted", "",
        "- **A kill at any moment** (SIGKILL, a node lost): `last.ckpt` is written to a temporary file, flushed",
        "  and renamed into place, so it is always the last complete checkpoint. Resuming with",
        "  `ckpt_path=.../last.ckpt` repeats the steps since then and reaches the uninterrupted run bit for",
        "  bit — weights, EMA weights and their update count, optimizer, data order, random draws.",
        "  `test_many_kills_at_arbitrary_steps_resume_to_the_uninterrupted_run` kills one run 12 times at",
        "  random steps (in the middle of a step or after it) and compares; the EMA used to lose one update",
        "  per resume (it was updated after the checkpoint of its step was written) and now moves inside",
        "  the optimizer step.",
        "- **Ctrl-C or SIGTERM** (a cluster's notice): training stops at the end of the current step, writes",
        "  `last.ckpt` there and exits with 130 or 143 and the command to resume; under DDP all processes",
        "  stop at the same step. A second signal stops at once; the previous checkpoint is intact.",
        "- **A full disk**: the temporary file is removed, the previous `last.ckpt` is untouched, and the",
        "  message says so.",
        "- **Resuming a finished run** (a requeued job): nothing to do, exit 0.",
        "- **The log of a run resumed in its own folder** (`hydra.run.dir` kept): `csv/metrics.csv` continues",
        "  from the resumed step, every step logged once (Lightning's CSV logger deleted the earlier rows).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
