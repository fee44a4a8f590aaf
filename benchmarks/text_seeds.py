"""Prompt adherence of `experiment=shapes_text` over seeds, for variants of the text conditioner.

Each (variant, seed) is trained once through unfog's own training path (cached, as in
benchmarks/samplers.py) with ``seed=S`` and the variant's overrides, then scored as
docs/conditioning.md scores the preset: the captions of 360 held-out scenes are the prompts,
guidance 3, ``shapes_checker`` reads colour, shape, count and position back; the same images
against shuffled prompts give chance. Results accumulate in one JSON (one key per run), so
several invocations can run side by side (give each ``OMP_NUM_THREADS=1``)::

    python benchmarks/text_seeds.py --variant qr --seeds 1 2
    python benchmarks/text_seeds.py --variant plain --seeds 1 2
    python benchmarks/text_seeds.py --report          # mean, min and max per variant

"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from conditioning import run_text  # noqa: E402
from samplers import machine, trained_checkpoint  # noqa: E402

VARIANTS = {
    "qr": [],  # the preset as it stands
    "plain": ["conditioners.text.quotient_remainder=false"],
}


def record(path: Path, key: str, value: dict, workdir: Path) -> None:
    """Add ``key`` to the JSON at ``path`` under a lock (runs side by side share the file)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
        report["runs"][key] = value
        report["machine"] = machine()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)


def summarise(path: Path) -> str:
    runs = json.loads(path.read_text())["runs"]
    lines = ["| variant | seeds | colour | shape | count | position | all right | chance (all right) |",
             "|---|---|---|---|---|---|---|---|"]
    for variant in sorted({r["variant"] for r in runs.values()}):
        rows = [r for r in runs.values() if r["variant"] == variant]
        cells = []
        for attr in ("color", "shape", "count", "position", "all_correct"):
            vals = [100 * r["scores"]["prompts"][attr] for r in rows]
            cells.append(f"{statistics.mean(vals):.1f} % ({min(vals):.1f}–{max(vals):.1f})")
        chance = statistics.mean(100 * r["scores"]["shuffled_prompts"]["all_correct"] for r in rows)
        seeds = ", ".join(str(r["seed"]) for r in sorted(rows, key=lambda r: r["seed"]))
        lines.append(f"| {variant} | {seeds} | " + " | ".join(cells) + f" | {chance:.1f} % |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=list(VARIANTS), default="qr")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=360)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "text-seeds")
    p.add_argument("--json", type=Path, default=ROOT / "text-seeds-cpu.json")
    p.add_argument("--report", action="store_true", help="only print the table of what is recorded")
    args = p.parse_args(argv)
    if args.report:
        print(summarise(args.json))
        return
    os.environ.setdefault("WANDB_MODE", "offline")
    for seed in args.seeds:
        overrides = ["experiment=shapes_text", f"seed={seed}", *VARIANTS[args.variant]]
        start = time.perf_counter()
        checkpoint, train = trained_checkpoint(f"text-{args.variant}-{seed}", overrides, args.workdir)
        result = run_text(checkpoint, args.samples, [args.guidance], None)
        record(args.json, f"{args.variant}/{seed}", {
            "variant": args.variant, "seed": seed, "command": "unfog train " + " ".join(overrides),
            "train": train, "scores": result["guidance"][str(args.guidance)],
            "real_images": result["real_images"], "seconds": round(time.perf_counter() - start)}, args.workdir)
    print(summarise(args.json))


if __name__ == "__main__":
    main()
