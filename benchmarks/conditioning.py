"""Conditioning that runs on a CPU: text-to-image, super-resolution and inpainting, measured.

Trains (once, cached) each preset through unfog's own training path, then measures it on
data the model never saw:

- ``text`` (experiment=shapes_text): captions of held-out ``shapes`` scenes (another seed of
  the generator) are the prompts; ``shapes_checker`` reads colour, shape, count and position
  back from the generated pixels. The same images scored against *shuffled* prompts give the
  chance level, so the figure measures prompt adherence and not image quality alone.
- ``sr`` (experiment=shapes_sr): held-out 16×16 scenes are reduced to 8×8 and upscaled;
  PSNR to the original and the checker's score against the scene's caption, next to the
  bilinear upsampling the model is conditioned on (its input) as the baseline.
- ``inpaint`` (experiment=digits_inpaint): the held-out test digits with a hole (the bottom
  half, or the centre 4×4) are filled in; the digits classifier's accuracy on the result
  against the true labels, next to the same classifier on the masked input and on the
  originals, on the hole filled with the mean training digit, and against other images'
  labels (chance); and the mean squared error inside the hole.

    python benchmarks/conditioning.py                    # all three, report to stdout + JSON
    python benchmarks/conditioning.py --only text --write-docs

``--write-docs`` writes the figures' pictures (docs/conditioning-*.png) and the JSON that
docs/conditioning.md quotes. Needs only unfog's own dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from samplers import machine, trained_checkpoint  # noqa: E402  (the shared training cache)

PRESETS = {"text": ["experiment=shapes_text"], "sr": ["experiment=shapes_sr"], "inpaint": ["experiment=digits_inpaint"]}
GRID_PROMPTS = [
    "a red circle in the top left",
    "a blue square at the bottom right",
    "a green triangle in the center",
    "a yellow circle on the right",
    "two magenta squares",
    "two cyan triangles on the left and on the right",
    "a red square at the top and a blue circle at the bottom",
    "a yellow triangle in the top right and a green square in the bottom left",
]


def load(checkpoint: Path) -> tuple[Any, Any]:
    """The checkpoint's pipeline and the sampler it was trained with."""
    from unfog.config import build
    from unfog.pipeline import Pipeline

    pipeline = Pipeline.load(checkpoint)
    return pipeline, build("sampler", pipeline.config["sampler"])


def draw(checkpoint: Path, values: dict[str, Any], n: int, guidance: Any = 1.0, seed: int = 0,
         **kw: Any) -> Tensor:
    """``n`` samples for ``values``; ``kw`` are further SamplingSettings (guidance_rescale, ...)."""
    from unfog.schemas import SamplingSettings

    pipeline, sampler = load(checkpoint)
    settings = SamplingSettings(guidance=guidance, seed=seed, batch_size=128, **kw)
    return pipeline.generate(sampler, n, values, settings, progress=True)


def held_out_shapes(n: int) -> dict[str, Any]:
    """``n`` scenes of the shapes generator with seed 1 (training uses seed 0)."""
    from torch.utils.data import DataLoader

    import unfog

    ds = unfog.create("dataset", "shapes", size=16, max_objects=2, seed=1, length=n)
    return next(iter(DataLoader(ds, batch_size=n)))


def checker_scores(images: Tensor, captions: Sequence[str]) -> dict[str, float]:
    import unfog

    checker = unfog.create("metric", "shapes_checker")
    checker.update(generated=images, captions=list(captions))
    return {k: round(v, 4) for k, v in checker.compute().items()}


def psnr(a: Tensor, b: Tensor, peak: float = 2.0) -> float:
    """Mean PSNR (dB) of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return round(float((10 * torch.log10(peak**2 / mse)).mean()), 2)


# ---------------------------------------------------------------------------- tasks


def run_text(checkpoint: Path, n: int, guidances: Sequence[float], docs: Path | None) -> dict[str, Any]:
    batch = held_out_shapes(n)
    captions = list(batch["caption"])
    out: dict[str, Any] = {"n": n, "real_images": checker_scores(batch["x"], captions), "guidance": {}}
    shuffled = [captions[(k + n // 2) % n] for k in range(n)]
    for g in guidances:
        start = time.perf_counter()
        images = draw(checkpoint, {"caption": captions}, n, g)
        out["guidance"][str(g)] = {"prompts": checker_scores(images, captions),
                                   "shuffled_prompts": checker_scores(images, shuffled),
                                   "seconds": round(time.perf_counter() - start, 1)}
        print(f"[text] guidance {g}: {out['guidance'][str(g)]}", flush=True)
    if docs is not None:
        per = 6
        prompts = [p for p in GRID_PROMPTS for _ in range(per)]
        images = draw(checkpoint, {"caption": prompts}, len(prompts), max(guidances), seed=1)
        save_labelled_grid(images, GRID_PROMPTS, per, docs / "conditioning-text.png")
        out["grid"] = {"prompts": GRID_PROMPTS, "per_prompt": per, "guidance": max(guidances),
                       "scores": checker_scores(images, prompts)}
    return out


def run_sr(checkpoint: Path, n: int, docs: Path | None) -> dict[str, Any]:
    pipeline, _ = load(checkpoint)
    cond = pipeline.conditioners["image_concat"]
    batch = held_out_shapes(n)
    x, captions = batch["x"], list(batch["caption"])
    low = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="area")
    bilinear = cond(low)  # what the model is conditioned on: the 8×8 image brought back to 16×16
    sr = draw(checkpoint, {"x": low}, n)
    out = {"n": n, "factor": 2,
           "unfog_sr": {"psnr_db": psnr(sr, x), **checker_scores(sr, captions)},
           "bilinear": {"psnr_db": psnr(bilinear, x), **checker_scores(bilinear, captions)},
           "original": checker_scores(x, captions)}
    print(f"[sr] {out}", flush=True)
    if docs is not None:
        k = 10
        nearest = torch.nn.functional.interpolate(low[:k], scale_factor=2, mode="nearest")
        save_rows([nearest, bilinear[:k], sr[:k], x[:k]], ["8x8 input", "bilinear", "unfog", "original"],
                  docs / "conditioning-sr.png")
    return out


def run_inpaint(checkpoint: Path, docs: Path | None) -> dict[str, Any]:
    import unfog
    from unfog_conditioners.image_concat import box_mask
    from unfog_datasets.digits import digits_split

    x, labels = digits_split("test")
    n = len(x)
    mean_image = digits_split("train")[0].mean(0, keepdim=True)
    classifier = unfog.create("metric", "digits_classifier")

    def accuracy(images: Tensor, truth: Tensor = labels) -> float:
        return round(float((classifier.predict(images) == truth).float().mean()), 4)

    out: dict[str, Any] = {"n": n, "original_accuracy": accuracy(x), "holes": {}}
    pictures = []
    for name, box in {"bottom_half": (4, 0, 4, 8), "centre_4x4": (2, 2, 4, 4)}.items():
        mask = box_mask(n, 8, box)  # (n, 1, 8, 8), 1 = fill in
        hole = mask.bool().expand_as(x)
        masked = torch.where(hole, torch.zeros_like(x), x)
        filled = draw(checkpoint, {"x": {"image": x, "mask": mask}}, n)
        out["holes"][name] = {
            "accuracy_inpainted": accuracy(filled), "accuracy_masked_input": accuracy(masked),
            "accuracy_mean_fill": accuracy(torch.where(hole, mean_image.expand_as(x), x)),
            "accuracy_inpainted_vs_other_labels": accuracy(filled, labels.roll(n // 2)),  # chance level
            "hole_mse_mean_fill": round(float((mean_image.expand_as(x) - x)[hole].pow(2).mean()), 4),
            "hole_mse": round(float((filled - x)[hole].pow(2).mean()), 4),
            "known_mse": round(float((filled - x)[~hole].pow(2).mean()), 4),
        }
        print(f"[inpaint] {name}: {out['holes'][name]}", flush=True)
        pictures += [masked[:10], filled[:10]]
    if docs is not None:
        save_rows([*pictures, x[:10]], ["bottom half masked", "inpainted", "centre masked", "inpainted", "original"],
                  docs / "conditioning-inpaint.png")
    return out


# ---------------------------------------------------------------------------- pictures


def _tile(images: Tensor, scale: int) -> np.ndarray:
    from unfog.images import image_grid

    big = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest")
    grid = image_grid(big, nrow=len(images), value_range=(-1.0, 1.0), pad=2)
    return grid if grid.shape[-1] == 3 else np.repeat(grid, 3, axis=-1)


def save_labelled_grid(images: Tensor, prompts: Sequence[str], per: int, path: Path, scale: int = 4) -> None:
    """One row per prompt: the prompt, then its ``per`` samples."""
    rows = [_tile(images[k * per:(k + 1) * per], scale) for k in range(len(prompts))]
    _labelled(rows, list(prompts), path)


def save_rows(rows: Sequence[Tensor], labels: Sequence[str], path: Path, scale: int = 6) -> None:
    _labelled([_tile(r, scale) for r in rows], list(labels), path)


def _labelled(rows: list[np.ndarray], labels: list[str], path: Path) -> None:
    from PIL import Image, ImageDraw

    label_w = 7 * max(len(s) for s in labels) + 12
    h, w = sum(r.shape[0] for r in rows), label_w + max(r.shape[1] for r in rows)
    canvas = Image.new("RGB", (w, h), "white")
    pen, y = ImageDraw.Draw(canvas), 0
    for row, text in zip(rows, labels):
        canvas.paste(Image.fromarray(row), (label_w, y))
        pen.text((6, y + row.shape[0] // 2 - 5), text, fill="black")
        y += row.shape[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(PRESETS), action="append", help="run only this task (repeatable)")
    p.add_argument("--samples", type=int, default=360, help="held-out scenes for text and sr")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0], help="text: guidance scales")
    p.add_argument("--checkpoint", type=Path, default=None, help="evaluate this checkpoint (with one --only)")
    p.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "conditioning")
    p.add_argument("--json", type=Path, default=ROOT / "conditioning-cpu.json")
    p.add_argument("--write-docs", action="store_true", help="write docs/conditioning-*.png")
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    tasks = args.only or list(PRESETS)
    docs = ROOT.parent / "docs" if args.write_docs else None
    report: dict[str, Any] = json.loads(args.json.read_text()) if args.json.is_file() else {}
    report.setdefault("tasks", {})
    for name in tasks:
        start = time.perf_counter()
        if args.checkpoint is not None:
            checkpoint, record = args.checkpoint, {"checkpoint": str(args.checkpoint)}
        else:
            checkpoint, record = trained_checkpoint(name, PRESETS[name], args.workdir)
        if name == "text":
            result = run_text(checkpoint, args.samples, args.guidance, docs)
        elif name == "sr":
            result = run_sr(checkpoint, args.samples, docs)
        else:
            result = run_inpaint(checkpoint, docs)
        result["train"] = {**record, "command": "unfog train " + " ".join(PRESETS[name])}
        result["seconds"] = round(time.perf_counter() - start)
        report["tasks"][name] = result
    report["command"] = "python benchmarks/conditioning.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report["machine"] = machine()
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
