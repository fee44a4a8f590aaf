"""The figures unfog reaches on the data that runs here, through `unfog evaluate` itself.

For each model (dataset × backbone) the model is trained once through unfog's own training
path (cached, shared with benchmarks/samplers.py), then every (sampler, steps) cell is one
call of :func:`unfog.evaluation.evaluate` — the code behind `unfog evaluate` — whose JSON
record (results and protocol) is kept in the report.

- toy2d (swiss roll, `mlp`): sliced Wasserstein-2 and MMD² against fresh samples of the true
  distribution (`metric=sliced_wasserstein,mmd`).
- digits, shapes (`unet`, `dit`): Fréchet distance, KID, precision/recall and Inception Score
  in the feature space of an in-domain classifier trained by `unfog train-classifier`
  (Inception-v3 cannot be downloaded here), and the share of samples that classifier assigns
  to the requested class (`class_accuracy`).

    python benchmarks/results.py                      # train what is missing, evaluate, print
    python benchmarks/results.py --only digits/unet --steps 10 20
    python benchmarks/results.py --write-docs         # also docs/results.md and docs/results.png
    python benchmarks/results.py --merge A.json B.json --write-docs   # join parallel --only runs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from samplers import PALETTE, log_panel, machine, trained_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# name -> (dataset, cache name shared with benchmarks/samplers.py, `unfog train` overrides, guidance)
MODELS: dict[str, tuple[str, str, list[str], float]] = {
    "toy2d/mlp": ("toy2d", "toy2d", ["experiment=toy2d", "dataset.name=swiss_roll", "prediction=v"], 1.0),
    "digits/unet": ("digits", "digits", [], 2.0),
    "digits/dit": ("digits", "digits-dit", ["backbone=dit_tiny"], 2.0),
    "shapes/unet": ("shapes", "shapes-unet", ["experiment=shapes"], 2.0),
    "shapes/dit": ("shapes", "shapes-dit", ["experiment=shapes", "backbone=dit_tiny"], 2.0),
}
# The classifier each image dataset is measured with: `unfog train-classifier` settings.
CLASSIFIERS: dict[str, dict[str, Any]] = {
    "digits": {"dataset": {"_name_": "digits"}},
    "shapes": {"dataset": {"_name_": "shapes", "size": 16, "max_objects": 1}},
}
IMAGE_METRICS = "fid,kid,precision_recall,inception_score,class_accuracy"
POINT_METRICS = "sliced_wasserstein,mmd"
SWEEP_SAMPLERS = ("ddim", "ddpm", "dpm_solver_pp", "heun", "unipc", "euler_ancestral")
SWEEP_STEPS = (5, 10, 20, 50)
# Backbones other than the first of a dataset get a few cells, not the whole sweep.
SHORT_CELLS = (("ddim", 50), ("dpm_solver_pp", 20))
# Observations on the recorded run (benchmarks/results-cpu.json); revisit when it is regenerated.
NOTES = [
    "- Second-order and multistep solvers reach the data's own level in 10 steps: on toy2d,",
    "  `unipc` and `dpm_solver_pp` at 10 steps match fresh true samples (sliced W2 ≈ 0.05), while",
    "  `ddim` is still at 0.059 after 50; on digits the same order holds in the classifier FD",
    "  (`unipc` 10 steps 0.32, `ddim` 50 steps 0.39).",
    "- Ancestral sampling (`ddpm`) trades precision for recall at few steps (digits, 5 steps:",
    "  precision 0.98, recall 0.47); the ODE solvers reach recall 0.80–0.93 (real data: 0.92).",
    "  On shapes the order of FD flips: `ddpm` is lowest at every step count (0.84 at 50 steps,",
    "  the ODE solvers 1.6–1.8); why is not examined here.",
    "- The class-conditional DiT (`dit_tiny`, 2,000 steps) trails the U-Net at equal steps: digits FD",
    "  0.55–0.59 vs 0.35–0.39; on 16×16 shapes it draws the requested class 56 % of the time vs",
    "  96 % (the same weakness on small shapes as in the text experiment, docs/conditioning.md).",
    "- Shapes are pixel-exact, so the classifier's features of real scenes form tight clusters:",
    "  real held-out scenes have precision 0.998, U-Net samples 0.04–0.15 (most of them",
    "  lie outside every real sample's 3-NN ball) although at 20–50 steps their FD and KID are",
    "  at the level of real data. Precision/recall is the metric here that separates them.",
]
# The headline value of each dataset (lower is better) for the table's order and the plot.
HEADLINE = {"toy2d": ("sliced_wasserstein", "sw2"), "digits": ("fid", "fid"), "shapes": ("fid", "fid")}


def classifier(dataset: str, workdir: Path) -> Path:
    """A cached classifier of ``dataset`` trained by unfog's `train-classifier` code."""
    from unfog_metrics.classifier import train_classifier

    cfg = CLASSIFIERS[dataset]
    key = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    out = workdir / f"classifier-{dataset}-{key}"
    if (out / "done.json").is_file():
        return out
    print(f"[{dataset}] training the classifier: unfog train-classifier {_overrides_text(cfg)}", flush=True)
    result = train_classifier(cfg, out)
    (out / "done.json").write_text(json.dumps({k: str(v) for k, v in result.items()}, indent=2))
    return out


def _overrides_text(cfg: dict[str, Any]) -> str:
    node = dict(cfg["dataset"])
    return " ".join([f"dataset={node.pop('_name_')}", *(f"dataset.{k}={v}" for k, v in node.items())])


def compose_evaluate(overrides: Sequence[str]) -> Any:
    """The `unfog evaluate` config for ``overrides``, composed from conf/ as the CLI does."""
    from hydra import compose, initialize_config_dir

    from unfog.commands import conf_dir, split_metrics
    from unfog.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="evaluate", overrides=split_metrics(list(overrides)))


def cells(name: str, steps: Sequence[int]) -> list[tuple[str, int]]:
    first = next(m for m in MODELS if MODELS[m][0] == MODELS[name][0]) == name
    if first:
        return [(s, n) for s in SWEEP_SAMPLERS for n in steps]
    return [c for c in SHORT_CELLS if c[1] in steps] or [(s, max(steps)) for s, _ in SHORT_CELLS]


def run_model(name: str, steps: Sequence[int], samples: int, workdir: Path, outdir: Path) -> dict[str, Any]:
    from unfog.evaluation import evaluate

    dataset, cache_name, overrides, guidance = MODELS[name]
    checkpoint, record = trained_checkpoint(cache_name, overrides, workdir)
    if dataset == "toy2d":
        extra = [f"metric={POINT_METRICS}"]
    else:
        extra = [f"metric={IMAGE_METRICS}", "extractor=classifier",
                 f"extractor_weights={classifier(dataset, workdir)}"]
    runs = []
    for sampler, n in cells(name, steps):
        args = [f"checkpoint={checkpoint}", f"sampler={sampler}", f"sampler.steps={n}", f"num_samples={samples}",
                f"guidance={guidance}", *extra]
        start = time.perf_counter()
        result = evaluate(compose_evaluate(args), outdir / name.replace("/", "-") / f"{sampler}-{n}")
        seconds = time.perf_counter() - start
        flat = {f"{m}/{k}": v for m, values in result.results.items() for k, v in values.items()}
        print(f"[{name}] {sampler:<16} {n:>3} steps  " + "  ".join(f"{k}={v:.4g}" for k, v in flat.items())
              + f"  ({seconds:.0f} s)", flush=True)
        runs.append({"sampler": sampler, "steps": n, "results": result.results, "seconds": round(seconds, 1),
                     "command": "unfog evaluate " + " ".join(a.replace(str(ROOT) + "/", "") for a in args),
                     "protocol": result.record["protocol"]})
    return {"dataset": dataset, "train": record, "runs": runs}


# ---------------------------------------------------------------------------- report

COLUMNS = {
    "toy2d": [("sliced_wasserstein/sw2", "sliced W2 ↓", 4), ("mmd/mmd2", "MMD² ↓", 5)],
    "image": [("fid/fid", "FD (classifier) ↓", 2), ("kid/kid", "KID ↓", 4),
              ("precision_recall/precision", "precision ↑", 3),
              ("precision_recall/recall", "recall ↑", 3), ("inception_score/inception_score", "IS (classifier) ↑", 2),
              ("class_accuracy/accuracy", "class accuracy ↑", 3)],
}


def _value(run: dict[str, Any], key: str) -> float:
    metric, value = key.split("/")
    return run["results"][metric][value]


def markdown(report: dict[str, Any]) -> str:
    setup = report["setup"]
    lines = [
        "# Results on the data that runs here", "",
        "Measured with `unfog evaluate` on a 2-core CPU (no GPU was available); every number below",
        "comes with its whole protocol (sampler, seeds, guidance, feature extractor and reference",
        "hashes, versions) in `benchmarks/results-cpu.json`. Regenerate with `python benchmarks/results.py",
        f"--write-docs` (measured as `{setup['command']}`; {setup['seconds'] / 60:.0f} min of evaluation here",
        "beside other work; the models were trained first, times below).", "",
        "**How to read them.** Inception-v3 cannot be downloaded here, so the image metrics use the",
        "feature space of an in-domain classifier trained by `unfog train-classifier` (its",
        "penultimate 128 features; held-out accuracy below): the Fréchet distance (FD) is FID's",
        "formula in that space and is **not comparable to published FIDs**; IS is the",
        "classifier's Inception Score (at most the number of classes). The reference is the",
        "training set; toy2d is scored against fresh samples of the true distribution.",
        f"{setup['samples']} samples per cell (toy2d: {setup['toy2d_samples']}), seed 0. The \"real data\" line",
        "scores real images (digits: the 360 held-out test digits; shapes: 1,000 scenes of another",
        "seed) against the same reference: FD is biased upward at small sample counts, so that",
        "line is a guide, not a floor. KID in these features is noisy at this size: two random",
        "halves of the digits training set give −0.008 ± 0.021 (20 splits), so values within a",
        "few hundredths of 0 mean \"indistinguishable here\". `euler_ancestral` draws the samples",
        "of `ddpm` on these variance-preserving models up to float rounding (every figure agrees",
        "to at least 4 digits): the same ancestral step in other coordinates, same noise stream.", "",
    ]
    for dataset in ("toy2d", "digits", "shapes"):
        models = {k: v for k, v in report["models"].items() if v["dataset"] == dataset}
        if not models:
            continue
        columns = COLUMNS["toy2d" if dataset == "toy2d" else "image"]
        lines += [f"## {dataset}", ""]
        for name, res in models.items():
            train = res["train"]
            command = " ".join(o for o in train["overrides"] if o != "logger=csv") or "(the default experiment)"
            lines.append(f"- `{name}`: `unfog train {command}`"
                         f" — {train['steps']} steps, {train['seconds']:.0f} s, final loss {train['final_loss']:.4f}")
        if dataset in report.get("classifiers", {}):
            c = report["classifiers"][dataset]
            lines.append(f"- classifier: `unfog train-classifier {c['command']}` — held-out accuracy "
                         f"{c['accuracy']:.4f}, weights sha256 `{c['sha256'][:12]}…`")
        floor = report.get("floors", {}).get(dataset)
        if floor:
            lines.append("- real data scored the same way (held-out or fresh samples vs the reference): "
                         + ", ".join(f"{label.rstrip(' ↑↓')} {floor[key]:.{d}f}" for key, label, d in columns
                                     if key in floor))
        lines += ["", "| model | sampler | steps | " + " | ".join(c[1] for c in columns) + " | seconds |",
                  "|---|---|---:|" + "---:|" * len(columns) + "---:|"]
        for name, res in models.items():
            for run in res["runs"]:
                cells_ = [f"{_value(run, key):.{d}f}" for key, _, d in columns]
                lines.append(f"| {name} | {run['sampler']} | {run['steps']} | " + " | ".join(cells_)
                             + f" | {run['seconds']:.0f} |")
        lines.append("")
    lines += ["## What these runs show", "", *NOTES, ""]
    lines += ["## Quality against sampling steps", "",
              "![headline metric against sampler steps, one panel per dataset](results.png)", "",
              "Lower is better in every panel (toy2d: sliced W2; digits and shapes: the classifier FD).",
              "`heun` evaluates the network twice per step.", "",
              "One cell, in full: " + f"`{_first_command(report)}`", ""]
    return "\n".join(lines)


def _first_command(report: dict[str, Any]) -> str:
    for res in report["models"].values():
        for run in res["runs"]:
            return run["command"]
    return ""


def plot(report: dict[str, Any], path: Path) -> None:
    """The headline metric against sampler steps, one log-log panel per dataset's sweep."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=13)
    except TypeError:
        font = small = ImageFont.load_default()
    swept = [(n, r) for n, r in report["models"].items() if len({run["steps"] for run in r["runs"]}) > 2]
    if not swept:
        return
    samplers = list(dict.fromkeys(run["sampler"] for _, r in swept for run in r["runs"]))

    def series(name: str) -> list[tuple[Any, ...]]:  # the plotted values, to 3 digits
        out = []
        for _, r in swept:
            metric, value = HEADLINE[r["dataset"]]
            out.append(tuple(sorted((run["steps"], f"{run['results'][metric][value]:.3g}") for run in r["runs"]
                                    if run["sampler"] == name)))
        return out

    groups: dict[str, list[str]] = {}  # samplers whose plotted values agree share one line
    for name in samplers:
        twin = next((g for g in groups if series(g) == series(name)), None)
        groups.setdefault(twin or name, []).append(name)
    labels = list(groups)
    colors = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    pw, ph, legend_w = 520, 440, 230
    img = Image.new("RGB", (pw * len(swept) + legend_w, ph), "white")
    draw = ImageDraw.Draw(img)
    for i, (name, res) in enumerate(swept):
        metric, value = HEADLINE[res["dataset"]]
        lines = {label: [(run["steps"], run["results"][metric][value]) for run in res["runs"]
                         if run["sampler"] == label] for label in labels}
        floor = report.get("floors", {}).get(res["dataset"], {}).get(f"{metric}/{value}")
        title = f"{name}: {'sliced W2' if metric == 'sliced_wasserstein' else 'classifier FD'}"
        log_panel(draw, (i * pw, 0, pw, ph), title, "sampler steps (log)", sorted({r["steps"] for r in res["runs"]}),
                  lines, colors, [(floor, 3)] if floor else [], font, small)
    x0, y = pw * len(swept) + 10, 50
    for label in labels:
        draw.line([(x0, y + 8), (x0 + 28, y + 8)], fill=colors[label], width=3)
        draw.text((x0 + 36, y), " = ".join(groups[label]), fill="black", font=small)
        y += 22
    draw.line([(x0, y + 8), (x0 + 6, y + 8)], fill="black", width=2)
    draw.line([(x0 + 12, y + 8), (x0 + 18, y + 8)], fill="black", width=2)
    draw.text((x0 + 36, y), "real data", fill="black", font=small)
    img.save(path)


def floors(datasets: Sequence[str], workdir: Path, samples: int, toy2d_samples: int) -> dict[str, dict[str, float]]:
    """Each dataset's metrics on real data against the same reference: the best a model can score."""
    import unfog
    from unfog.evaluation import build_metrics, score, set_references, with_extractor

    out = {}
    for dataset in datasets:
        if dataset == "toy2d":
            node = {"_name_": "toy2d", "name": "swiss_roll"}
            real = unfog.create("dataset", "toy2d", name="swiss_roll", size=toy2d_samples, seed=12345).points
            nodes = {m: {"_name_": m} for m in POINT_METRICS.split(",")}
            labels = None
        else:
            node = ({"_name_": "digits"} if dataset == "digits"
                    else {**CLASSIFIERS["shapes"]["dataset"], "length": 20000})
            held = ({"_name_": "digits", "split": "test"} if dataset == "digits"
                    else {**node, "seed": 777, "length": samples})
            ds = unfog.create("dataset", held["_name_"], **{k: v for k, v in held.items() if k != "_name_"})
            items = [ds[i] for i in range(min(samples, len(ds)))]
            real = torch.stack([it["x"] for it in items])
            labels = torch.stack([torch.as_tensor(it["label"]) for it in items])
            nodes = with_extractor({m: {"_name_": m} for m in IMAGE_METRICS.split(",")}, "classifier",
                                   str(classifier(dataset, workdir)))
        metrics = build_metrics(nodes)
        ref = unfog.create("dataset", node["_name_"], **{k: v for k, v in node.items() if k != "_name_"})
        set_references(metrics, ref, node)
        results = score(metrics, real, labels)
        out[dataset] = {f"{m}/{k}": v for m, values in results.items() for k, v in values.items()}
        print(f"[{dataset}] real data: {out[dataset]}", flush=True)
    return out


def classifier_records(datasets: Sequence[str], workdir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for dataset in datasets:
        if dataset == "toy2d":
            continue
        folder = classifier(dataset, workdir)
        record = json.loads((folder / "classifier.json").read_text())
        out[dataset] = {"command": _overrides_text(CLASSIFIERS[dataset]), "sha256": record["weights_sha256"],
                        "accuracy": record["held_out"]["accuracy"], "seconds": record.get("seconds")}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(MODELS), action="append", help="run only this model (repeatable)")
    p.add_argument("--steps", type=int, nargs="+", default=list(SWEEP_STEPS), help="sampler steps of the sweep")
    p.add_argument("--samples", type=int, default=1000, help="generated samples per image cell")
    p.add_argument("--toy2d-samples", type=int, default=2000, help="generated samples per toy2d cell")
    p.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "samplers",
                   help="trained models and classifiers are cached here (shared with samplers.py)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results-cpu.json")
    p.add_argument("--write-docs", action="store_true", help="write docs/results.md and docs/results.png")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--train-only", action="store_true", help="train the models and classifiers, evaluate nothing")
    p.add_argument("--merge", type=Path, nargs="+", default=None, help="join these reports into --json")
    args = p.parse_args(argv)
    command = ("python benchmarks/results.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    if args.merge:
        reports = [json.loads(Path(f).read_text()) for f in args.merge]
        report = {**reports[0], "models": {k: v for r in reports for k, v in r["models"].items()},
                  "floors": {k: v for r in reports for k, v in r.get("floors", {}).items()},
                  "classifiers": {k: v for r in reports for k, v in r.get("classifiers", {}).items()}}
        report["setup"] = {**reports[0]["setup"], "command": "; ".join(r["setup"]["command"] for r in reports),
                           "seconds": sum(r["setup"]["seconds"] for r in reports)}
        return write(report, args.json, args.write_docs)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("UNFOG_CACHE", str(args.workdir / "unfog-cache"))
    start = time.perf_counter()
    names = args.only or list(MODELS)
    datasets = list(dict.fromkeys(MODELS[n][0] for n in names))
    if args.train_only:
        for name in names:
            trained_checkpoint(MODELS[name][1], MODELS[name][2], args.workdir)
        for dataset in datasets:
            if dataset != "toy2d":
                classifier(dataset, args.workdir)
        return
    outdir = args.workdir / "evaluations"
    models = {name: run_model(name, args.steps, args.toy2d_samples if MODELS[name][0] == "toy2d" else args.samples,
                              args.workdir, outdir) for name in names}
    report = {
        "setup": {"command": command, "steps": args.steps, "samples": args.samples,
                  "toy2d_samples": args.toy2d_samples, "seconds": round(time.perf_counter() - start)},
        "machine": machine(),
        "classifiers": classifier_records(datasets, args.workdir),
        "floors": floors(datasets, args.workdir, args.samples, args.toy2d_samples),
        "models": models,
    }
    write(report, args.json, args.write_docs)


def write(report: dict[str, Any], path: Path, docs: bool) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    text = markdown(report)
    if docs:
        (ROOT / "docs" / "results.md").write_text(text)
        plot(report, ROOT / "docs" / "results.png")
        print("wrote docs/results.md and docs/results.png")
    else:
        print(text)


if __name__ == "__main__":
    main()
