"""Latent vs pixel diffusion at 64×64 on this CPU: every figure of docs/latent.md.

Stages (each cached in --workdir, so a rerun measures only what is missing):

- ``autoencoders``: ``unfog train-classifier`` on 64×64 shapes (the features of the
  reconstruction FD), then ``unfog train-autoencoder`` at factor 4 and factor 8; held-out
  PSNR, SSIM and reconstruction FD from each folder's autoencoder.json (the command measures
  them), beside the FD of two disjoint held-out sets of real images (the floor).
- ``speed``: training steps per second of the same DiT (dit_tiny: patch 2, 4 blocks of width
  128) on the f=4 latents (4×16×16, 64 tokens) and on 64×64 pixels (1,024 tokens; and with
  8×8 patches, 64 tokens), each timed after its data are ready, so the encoder is excluded;
  the cache build of 20,000 images timed on its own.
- ``adherence``: ``unfog train experiment=shapes64_text`` with the f=4 autoencoder, and a
  pixel run (autoencoder=identity, 8×8 patches: the same token count and width), side by
  side with one thread each, for the same CPU wall-clock (``trainer.max_time``: --budget
  seconds of training, and the pixel run also the seconds the latent cache took to build).
  The captions of 360 held-out scenes are the prompts (guidance 3); ``shapes_checker`` reads
  colour, shape, count and position back from the pixels; the same images against shuffled
  prompts give chance. Sample grids for the docs.

    python benchmarks/latent.py autoencoders speed adherence
    python benchmarks/latent.py --write-docs            # also docs/latent-*.png

Each training runs as its own ``unfog`` process with the machine's threads (run nothing else
beside it when timing). Results: benchmarks/latent-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from conditioning import GRID_PROMPTS, checker_scores, save_labelled_grid  # noqa: E402
from samplers import machine  # noqa: E402

SIZE = 64
FACTORS = (4, 8)
AE_STEPS = 1500
AE_BATCH = 16
CLASSIFIER = ["dataset=shapes", f"dataset.size={SIZE}", "dataset.max_objects=1"]
PIXEL = ["autoencoder=identity", "backbone.patch_size=8"]
SPEED = {  # name -> extra overrides of `unfog train experiment=shapes64_text`; steps timed
    "latent f=4, patch 2 (64 tokens)": ([], 300),
    "pixels, patch 2 (1,024 tokens)": (["autoencoder=identity"], 30),
    "pixels, patch 4 (256 tokens)": (["autoencoder=identity", "backbone.patch_size=4"], 100),
    "pixels, patch 8 (64 tokens)": (PIXEL, 300),
}


def unfog(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``unfog ARGS`` in ``cwd``; its output (raises with it when the command fails)."""
    exe = Path(sys.executable).with_name("unfog")
    full = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    print(f"$ unfog {' '.join(args)}", flush=True)
    proc = subprocess.run([str(exe), *args], cwd=cwd, env=full, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(f"unfog {' '.join(args)} failed:\n{out[-3000:]}")
    return out


def _folder(out: str, pattern: str) -> Path:
    found = re.findall(pattern, out)
    if not found:
        raise RuntimeError(f"no {pattern!r} in the output:\n{out[-2000:]}")
    return Path(found[-1])


def _cached(workdir: Path, name: str, make: Any) -> dict[str, Any]:
    path = workdir / f"{name}.json"
    if path.is_file():
        print(f"[{name}] reusing {path}", flush=True)
        return json.loads(path.read_text())
    start = time.perf_counter()
    record = make()
    record["wall_seconds"] = round(time.perf_counter() - start, 1)
    path.write_text(json.dumps(record, indent=2))
    return record


# ------------------------------------------------------------------------------ stages


def autoencoders(workdir: Path, steps: int, factors: Sequence[int] = FACTORS) -> dict[str, Any]:
    def classifier() -> dict[str, Any]:
        out = unfog("train-classifier", *CLASSIFIER, cwd=workdir)
        folder = _folder(out, r"extractor_weights=(\S+)")
        return {"command": "unfog train-classifier " + " ".join(CLASSIFIER), "folder": str(folder),
                "accuracy": json.loads((folder / "classifier.json").read_text()).get("accuracy")}

    clf = _cached(workdir, "classifier", classifier)
    report: dict[str, Any] = {"classifier": clf, "factors": {}}
    for f in factors:
        args = ["dataset=shapes", f"dataset.size={SIZE}", "dataset.max_objects=2", "autoencoder=kl",
                f"autoencoder.factor={f}", f"steps={steps}", f"batch_size={AE_BATCH}", "progress_bar=false",
                f"eval.extractor_weights={clf['folder']}"]

        def train(args: list[str] = args) -> dict[str, Any]:
            out = unfog("train-autoencoder", *args, cwd=workdir)
            folder = _folder(out, r"autoencoder\.weights=(\S+)")
            record = json.loads((folder / "autoencoder.json").read_text())
            return {"command": "unfog train-autoencoder " + " ".join(args), "folder": str(folder),
                    "metrics": record.get("metrics"), "protocol": record.get("protocol"),
                    "seconds": record.get("seconds"), "config": record.get("config")}

        report["factors"][str(f)] = _cached(workdir, f"autoencoder-f{f}", train)
    report["real_floor_fd"] = _cached(workdir, "real-floor", lambda: real_floor(clf["folder"]))
    return report


def real_floor(classifier: str) -> dict[str, Any]:
    """FD in the classifier's features between two disjoint sets of 1,000 held-out real images."""
    import numpy as np

    import unfog
    from unfog_metrics.classifier import ClassifierExtractor
    from unfog_metrics.distribution import frechet_distance

    ds = unfog.create("dataset", "shapes", size=SIZE, max_objects=2, seed=1000003, length=2000)
    x = torch.stack([ds[i]["x"] for i in range(len(ds))])
    ex = ClassifierExtractor(classifier, device="cpu")
    a, b = ex.features(x[:1000]).numpy(), ex.features(x[1000:]).numpy()
    fd = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    return {"fd": float(fd), "n": 1000, "how": "held-out scenes 0-999 vs 1000-1999 (shapes seed 1000003)"}


def speed(workdir: Path, ae_folder: str) -> dict[str, Any]:
    cache = workdir / "cache"
    rows: dict[str, Any] = {}
    for name, (extra, steps) in SPEED.items():
        weights = [] if "autoencoder=identity" in extra else [f"autoencoder.weights={ae_folder}"]
        args = ["experiment=shapes64_text", *weights, *extra, f"trainer.max_steps={steps}",
                "sampling.num_samples=0", "logger=csv", "checkpoint.every_n_steps=100000"]

        def timed(args: list[str] = args, steps: int = steps) -> dict[str, Any]:
            start = time.perf_counter()
            out = unfog("train", *args, cwd=workdir, env={"UNFOG_CACHE_DIR": str(cache)})
            found = re.search(r"trained (\d+) steps in (\d+) s", out)
            encoded = re.search(r"encoded (\d+) items in ([\d.]+) s", out)
            fit = float(found.group(2))  # Lightning's fit only: the data (and cache) are ready before it
            return {"command": "unfog train " + " ".join(args), "steps": int(found.group(1)),
                    "fit_seconds": fit, "steps_per_second": round(int(found.group(1)) / fit, 3),
                    "cache_build_seconds": float(encoded.group(2)) if encoded else None,
                    "process_seconds": round(time.perf_counter() - start, 1)}

        rows[name] = _cached(workdir, "speed-" + re.sub(r"\W+", "_", name), timed)
    base = rows["latent f=4, patch 2 (64 tokens)"]["steps_per_second"]
    for row in rows.values():
        row["latent_speedup"] = round(base / row["steps_per_second"], 2)
    return rows


def held_out(n: int) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    import unfog

    ds = unfog.create("dataset", "shapes", size=SIZE, max_objects=2, seed=1, length=n)
    return next(iter(DataLoader(ds, batch_size=n)))


def adherence(workdir: Path, ae_folder: str, samples: int, budget: int, docs: Path | None) -> dict[str, Any]:
    """The latent and the pixel run side by side, one thread each, for the same CPU wall-clock:
    ``budget`` seconds of training, plus, for the pixel run, the seconds the latent run's cache
    took to build (built first, timed)."""
    cache = workdir / "cache"
    env = {"UNFOG_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    common = ["experiment=shapes64_text", "logger=csv"]

    def build_cache() -> dict[str, Any]:
        args = [*common, f"autoencoder.weights={ae_folder}", "trainer.max_steps=1", "sampling.num_samples=0"]
        out = unfog("train", *args, cwd=workdir, env=env)
        encoded = re.search(r"encoded (\d+) items in ([\d.]+) s", out)
        return {"command": "unfog train " + " ".join(args), "items": int(encoded.group(1)) if encoded else None,
                "cache_build_seconds": float(encoded.group(2)) if encoded else None}

    built = _cached(workdir, "cache-build", build_cache)
    runs = {
        "latent": [*common, f"autoencoder.weights={ae_folder}", f"trainer.max_time={{seconds:{budget}}}"],
        "pixel": [*common, *PIXEL, "trainer.max_steps=1000000",
                  f"trainer.max_time={{seconds:{budget + int(built['cache_build_seconds'] or 0)}}}"],
    }

    def side_by_side() -> dict[str, Any]:
        exe = Path(sys.executable).with_name("unfog")
        procs = {name: subprocess.Popen([str(exe), "train", *args], cwd=workdir, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env={**os.environ, "WANDB_MODE": "offline", **env})
                 for name, args in runs.items()}
        out = {}
        for name, proc in procs.items():
            text, _ = proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"{name} failed:\n{text[-3000:]}")
            found = re.search(r"trained (\d+) steps in (\d+) s", text)
            out[name] = {"command": "unfog train " + " ".join(runs[name]), "steps": int(found.group(1)),
                         "train_seconds": int(found.group(2)), "checkpoint": str(_folder(text, r"checkpoint: (\S+)"))}
        return out

    trained = _cached(workdir, f"adherence-{budget}", side_by_side)
    batch = held_out(samples)
    captions = list(batch["caption"])
    shuffled = [captions[(k + samples // 2) % samples] for k in range(samples)]
    report: dict[str, Any] = {"n": samples, "guidance": 3.0, "real_images": checker_scores(batch["x"], captions),
                              "budget_seconds": budget, "cache": built, "runs": {}}
    for name in runs:
        run = trained[name]

        def score(run: dict[str, Any] = run) -> dict[str, Any]:
            start = time.perf_counter()
            images = _draw(run["checkpoint"], {"caption": captions}, samples)
            return {"prompts": checker_scores(images, captions), "shuffled_prompts": checker_scores(images, shuffled),
                    "sampling_seconds": round(time.perf_counter() - start, 1)}

        report["runs"][name] = {**run, **_cached(workdir, f"scores-{name}-{budget}-{samples}", score)}
        if docs is not None:
            per = 6
            prompts = [p for p in GRID_PROMPTS for _ in range(per)]
            images = _draw(run["checkpoint"], {"caption": prompts}, len(prompts), seed=1)
            save_labelled_grid(images, GRID_PROMPTS, per, docs / f"latent-{name}.png", scale=1)
    return report


def _draw(checkpoint: str, values: dict[str, Any], n: int, seed: int = 0) -> torch.Tensor:
    from unfog.config import build
    from unfog.pipeline import Pipeline
    from unfog.schemas import SamplingSettings

    pipeline = Pipeline.load(checkpoint)
    sampler = build("sampler", pipeline.config["sampler"])
    return pipeline.generate(sampler, n, values, SamplingSettings(guidance=3.0, seed=seed, batch_size=60),
                             progress=True)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stages", nargs="*", default=["autoencoders", "speed", "adherence"],
                   choices=["autoencoders", "speed", "adherence"])
    p.add_argument("--ae-steps", type=int, default=AE_STEPS)
    p.add_argument("--factors", type=int, nargs="+", default=list(FACTORS), help="autoencoders to train")
    p.add_argument("--samples", type=int, default=360)
    p.add_argument("--budget", type=int, default=1500, help="adherence: seconds of training of each run")
    p.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "latent")
    p.add_argument("--json", type=Path, default=ROOT / "latent-cpu.json")
    p.add_argument("--write-docs", action="store_true", help="write docs/latent-*.png")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    docs = ROOT.parent / "docs" if args.write_docs else None
    report: dict[str, Any] = json.loads(args.json.read_text()) if args.json.is_file() else {}
    ae = autoencoders(args.workdir, args.ae_steps, args.factors)
    report["autoencoders"] = ae
    f4 = ae["factors"].get("4", {}).get("folder")
    if "speed" in args.stages:
        report["speed"] = speed(args.workdir, f4)
    if "adherence" in args.stages:
        report["adherence"] = adherence(args.workdir, f4, args.samples, args.budget, docs)
    report["command"] = "python benchmarks/latent.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report["machine"] = machine()
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
