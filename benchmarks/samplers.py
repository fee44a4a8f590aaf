"""Quality per function evaluation: every registered sampler against the true data.

Trains (once, cached) a model on a 2-D toy distribution and one on the 8×8 digits through
unfog's own training path, then samples each with every registered sampler at a budget of
5, 10, 20, 50, 100 and 1000 function evaluations (NFE, counted by ``Denoiser.nfe``) and
measures how far the samples are from the true distribution:

- sliced Wasserstein-2 distance (Bonneel et al. 2015): the root mean over random unit
  directions θ of the exact 1-D W2² between the projected sets (sorted, equal sizes);
- squared MMD, unbiased estimate (Gretton et al. 2012, Eq. 3), with a mixture of RBF kernels
  whose bandwidths are 0.5, 1 and 2 × the median pairwise distance of the reference set.

Both are measured against *fresh* samples of the true distribution (toy2d: new points from
its generator with another seed; digits: the held-out test split). The floor — the same
distance between two independent true samples of the same size — shows the noise level.

    python benchmarks/samplers.py                         # both models, report to stdout + JSON
    python benchmarks/samplers.py --only toy2d --nfe 5 10 20
    python benchmarks/samplers.py --write-docs            # also docs/samplers.md and docs/samplers.png

Needs only unfog's own dependencies (the plot is drawn with Pillow).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# The distances are the `sliced_wasserstein` and `mmd` metrics' own functions (one implementation).
from unfog_metrics.toy2d_metrics import median_distance, mmd2, sliced_w2

ROOT = Path(__file__).resolve().parents[1]
NFE_TARGETS = (5, 10, 20, 50, 100, 1000)
REFERENCE = "ddpm"  # the reference sampler, at 1000 evaluations
AIM_NFE = (10, 20)  # a second-order sampler here should be within AIM_RATIO of the reference
AIM_RATIO = 1.10

# What is trained: Hydra overrides of `unfog train` (the CLI's own config tree).
MODELS: dict[str, list[str]] = {
    "toy2d": ["experiment=toy2d", "dataset.name=swiss_roll", "prediction=v"],
    "digits": [],  # the default experiment: class-conditional digits, unet_digits, cosine schedule
}
COMMON_OVERRIDES = ["logger=csv"]
# Extra settings per sampler beyond its defaults: one row of the table per entry.
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "dpm_solver_pp": [{"order": 2}, {"order": 3}],
}


# ---------------------------------------------------------------------------- distances


class Distances:
    """Both distances of a sample to one fixed reference set of the true distribution."""

    def __init__(self, reference: Tensor, projections: int, seed: int) -> None:
        self.reference = reference
        self.projections, self.seed = projections, seed
        h = median_distance(reference)
        self.bandwidths = (0.5 * h, h, 2.0 * h)

    def __call__(self, x: Tensor) -> dict[str, float]:
        return {"sw2": sliced_w2(x, self.reference, self.projections, self.seed),
                "mmd2": mmd2(x, self.reference, self.bandwidths)}


# ---------------------------------------------------------------------------- training


def compose_train(overrides: Sequence[str]) -> Any:
    """The `unfog train` config for ``overrides``, composed from the repository's conf/ as the CLI does."""
    from hydra import compose, initialize_config_dir

    from unfog.commands import conf_dir
    from unfog.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def trained_checkpoint(name: str, overrides: Sequence[str], workdir: Path) -> tuple[Path, dict[str, Any]]:
    """Train ``overrides`` with ``unfog.commands.train.train`` unless a finished run is cached; its checkpoint
    and record."""
    from unfog.commands.train import train

    overrides = [*COMMON_OVERRIDES, *overrides]
    key = hashlib.sha1(json.dumps(overrides).encode()).hexdigest()[:10]
    run_dir = workdir / f"{name}-{key}"
    done = run_dir / "done.json"
    if done.is_file():
        record = json.loads(done.read_text())
        print(f"[{name}] reusing the model trained in {run_dir}", flush=True)
        return Path(record["checkpoint"]), record
    print(f"[{name}] training: unfog train {' '.join(overrides)}  (run dir {run_dir})", flush=True)
    result = train(compose_train(overrides), run_dir)
    record = {"overrides": overrides, "checkpoint": str(result.checkpoint), "steps": result.steps,
              "seconds": round(result.seconds, 1), "final_loss": result.final_loss}
    done.write_text(json.dumps(record, indent=2))  # written last: a killed run is retrained
    return result.checkpoint, record


# ---------------------------------------------------------------------------- samplers


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the table: a registered sampler with fixed settings (``steps`` added per budget)."""

    name: str
    kwargs: dict[str, Any]

    @property
    def label(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.kwargs.items() if k != "spacing")
        return f"{self.name} {extra}".strip()

    def build(self, steps: int) -> Any:
        import unfog

        return unfog.create("sampler", self.name, **self.kwargs, steps=steps)

    def higher_order(self) -> bool:
        """Whether this is a second- (or higher-) order solver: Heun, or a sampler with ``order`` ≥ 2."""
        return self.name == "heun" or int(getattr(self.build(1), "order", 1)) >= 2


def sampler_variants(schedule: Any, spacing: str = "logsnr") -> tuple[list[Variant], list[str]]:
    """Every registered sampler with a ``steps`` parameter (and the listed variants); the names skipped.

    On a discrete schedule, samplers whose ``spacing`` defaults to None (the leading grid points,
    which start below t = 1 and waste few-step budgets) use ``spacing``; the default ``logsnr`` is the
    grid DPM-Solver++ and UniPC use by default, so every sampler walks the same times. (``trailing``
    starts at t = 1, where x̂₀ = (x − σ·ε̂)/α divides by α(1) ≈ 0 of the cosine schedule: unclipped
    2-D samples diverge.)
    """
    import unfog
    from unfog.config import params_of

    out, skipped = [], []
    for name in unfog.available("sampler"):
        params = {p.name: p for p in params_of(unfog.get("sampler", name).obj)}
        if "steps" not in params:
            skipped.append(name)
            continue
        base = {}
        if "spacing" in params and params["spacing"].default is None and schedule.num_timesteps is not None:
            base["spacing"] = spacing
        for extra in VARIANTS.get(name, [{}]):
            out.append(Variant(name, {**extra, **base}))
    return out, skipped


def count_nfe(sampler: Any, schedule: Any, prediction: str, data_shape: Sequence[int]) -> int:
    """Denoiser calls ``sampler`` makes, counted on one sample with a zero network (cheap)."""
    from unfog.diffusion import Denoiser

    denoiser = Denoiser(lambda x, t, cond: torch.zeros_like(x), schedule, prediction)
    sampler.sample(denoiser, torch.randn(1, *data_shape), None)
    return denoiser.nfe


def steps_for_nfe(variant: Variant, target: int, nfe_of: Callable[[Any], int]) -> int | None:
    """The most steps whose evaluation count is at most ``target`` (None if even one step costs more)."""
    from unfog.errors import ConfigError

    def cost(steps: int) -> float:
        try:
            return nfe_of(variant.build(steps))
        except ConfigError:  # e.g. more steps than a discrete schedule's T
            return math.inf

    steps = target
    for _ in range(64):
        n = cost(steps)
        if n <= target:
            while cost(steps + 1) <= target:
                steps += 1
            return steps
        if steps == 1:
            return None
        guess = steps * target // n if math.isfinite(n) else steps // 2
        steps = max(1, min(steps - 1, int(guess)))
    return None


class Counting:
    """Wraps a sampler and records how many denoiser evaluations each ``sample`` call made."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.nfe: list[int] = []

    def sample(self, denoiser: Any, noise: Tensor, rng: Any = None) -> Tensor:
        before = denoiser.nfe
        out = self.inner.sample(denoiser, noise, rng)
        self.nfe.append(denoiser.nfe - before)
        return out


# ---------------------------------------------------------------------------- data


@dataclasses.dataclass
class Task:
    """A trained model with its fresh true data: what to sample and what to compare with."""

    name: str
    pipeline: Any  # unfog.pipeline.DiffusionPipeline
    schedule: Any
    prediction: str
    data_shape: tuple[int, ...]
    clip: tuple[float, float] | None
    values: dict[str, Tensor] | None  # conditioning for each generated sample
    reference: Tensor  # fresh true samples, compared with the generated ones
    second: Tensor  # another independent true sample of the same size (for the floor)
    description: str


def load_task(name: str, checkpoint: Path, samples: int, seed: int) -> Task:
    """The model of ``checkpoint`` and fresh samples of its true data distribution."""
    from unfog.pipeline import Pipeline

    pipeline = Pipeline.load(checkpoint)
    model, schedule, cfg = pipeline.model, pipeline.schedule, pipeline.config
    wiring = pipeline.wiring
    data = cfg["dataset"]
    clip = tuple(wiring["data_range"]) if wiring["data_range"] else None
    if data["_name_"] == "toy2d":
        from unfog_datasets.toy2d import sample_toy2d

        train_seed = int(data.get("seed", 0))
        ref = sample_toy2d(data["name"], samples, train_seed + 1000 + seed)
        second = sample_toy2d(data["name"], samples, train_seed + 2000 + seed)
        desc = (f"toy2d `{data['name']}`: {samples} generated points against {samples} fresh points "
                f"of the generator (seed {train_seed + 1000 + seed}; the model trained on seed {train_seed})")
        return Task(name, pipeline, schedule, cfg["prediction"], tuple(wiring["data_shape"]), clip, None,
                    ref, second, desc)
    if data["_name_"] == "digits":
        from unfog_datasets.digits import digits_split

        frac = float(data.get("test_fraction", 0.2))
        x_test, y_test = digits_split("test", frac)
        x_train, _ = digits_split("train", frac)
        n = min(samples, len(x_test))
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(x_test), generator=g)[:n]
        second = x_train[torch.randperm(len(x_train), generator=g)[:n]]
        values = {"label": y_test[pick]} if model.conditioners else None
        desc = (f"digits: {n} generated 8×8 images (64-D, range [-1, 1]; conditioned on the test labels, "
                f"guidance 1) against the {n} held-out test images; floor: {n} random training images "
                f"against the same test images")
        return Task(name, pipeline, schedule, cfg["prediction"], tuple(wiring["data_shape"]), clip, values,
                    x_test[pick], second, desc)
    raise SystemExit(f"samplers.py: no true-data source for dataset {data['_name_']!r}; add one to load_task.")


# ---------------------------------------------------------------------------- the benchmark


def run_task(task: Task, nfe_targets: Sequence[int], max_nfe: int, distances: Distances,
             seed: int, spacing: str = "logsnr") -> dict[str, Any]:
    """Sample ``task`` with every variant at every budget; distances and counted NFE per run."""
    from unfog.schemas import SamplingSettings

    variants, skipped = sampler_variants(task.schedule, spacing)
    n = len(task.reference)

    def nfe_of(sampler: Any) -> int:
        return count_nfe(sampler, task.schedule, task.prediction, task.data_shape)

    floor = distances(task.second)
    print(f"[{task.name}] floor: sw2={floor['sw2']:.4f} mmd2={floor['mmd2']:.2e}", flush=True)
    runs = []
    for variant in variants:
        for target in sorted(set(nfe_targets) | ({1000} if variant.name == REFERENCE else set())):
            if target > max_nfe and not (variant.name == REFERENCE and target == 1000):
                continue
            if variant.name == REFERENCE and target == 1000 and task.schedule.num_timesteps == 1000:
                # the reference is the canonical 1000-step DDPM: every point of the training grid
                variant = Variant(variant.name, {k: v for k, v in variant.kwargs.items() if k != "spacing"})
            steps = steps_for_nfe(variant, target, nfe_of)
            if steps is None:
                runs.append({"sampler": variant.label, "name": variant.name, "kwargs": variant.kwargs,
                             "target_nfe": target, "skipped": "one step costs more evaluations than this"})
                continue
            sampler = Counting(variant.build(steps))
            start = time.perf_counter()
            x = task.pipeline.generate(sampler, n, task.values, SamplingSettings(
                guidance=1.0, clip=task.clip is not None, seed=seed, batch_size=n))
            seconds = time.perf_counter() - start
            if not torch.isfinite(x).all():
                d = {"sw2": math.inf, "mmd2": math.inf}
            else:
                d = distances(x)
            runs.append({"sampler": variant.label, "name": variant.name, "kwargs": variant.kwargs,
                         "higher_order": variant.higher_order(), "target_nfe": target, "steps": steps,
                         "nfe": max(sampler.nfe), **d, "seconds": round(seconds, 2)})
            print(f"[{task.name}] {variant.label:<22} nfe {max(sampler.nfe):>4} (steps {steps:>4}) "
                  f"sw2={d['sw2']:.4f} mmd2={d['mmd2']:.2e}  {seconds:.1f}s", flush=True)
    return {"description": task.description, "samples": n, "floor": floor, "runs": runs,
            "skipped_samplers": skipped, "max_nfe_all_samplers": max_nfe, "nfe_targets": sorted(nfe_targets),
            "schedule": type(task.schedule).__name__, "prediction": task.prediction}


def reference_run(result: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in result["runs"] if r["name"] == REFERENCE and r.get("target_nfe") == 1000
                 and "sw2" in r), None)


def aim(result: dict[str, Any]) -> dict[str, Any]:
    """Is some second-order sampler at 10–20 NFE within 10 % of 1000-step DDPM (sliced W2)?"""
    ref = reference_run(result)
    if ref is None:
        return {"met": None, "why": f"no {REFERENCE} run at 1000 evaluations"}
    rows = [{"sampler": r["sampler"], "nfe": r["nfe"], "sw2": r["sw2"], "ratio": r["sw2"] / ref["sw2"]}
            for r in result["runs"] if r.get("higher_order") and r["target_nfe"] in AIM_NFE and "sw2" in r]
    best = min(rows, key=lambda r: r["ratio"], default=None)
    mmd = min(((r["mmd2"], r["sampler"], r["nfe"]) for r in result["runs"]
               if r.get("higher_order") and r["target_nfe"] in AIM_NFE and "mmd2" in r), default=None)
    return {"met": bool(best and best["ratio"] <= AIM_RATIO), "reference_sw2": ref["sw2"], "best": best,
            "candidates": rows, "reference_mmd2": ref["mmd2"], "best_mmd2": mmd,
            "floor_sw2": result["floor"]["sw2"], "floor_mmd2": result["floor"]["mmd2"]}


def machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "processor": _cpu_name(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------- report


def _cell(run: dict[str, Any] | None, key: str) -> str:
    if run is None:
        return ""
    if key not in run:
        return "—"
    v = run[key]
    text = f"{v:.4f}" if key == "sw2" else f"{v * 1e3:.2f}"
    return text + (f" ({run['nfe']})" if run["nfe"] != run["target_nfe"] else "")


def markdown_table(result: dict[str, Any], key: str) -> list[str]:
    targets = sorted({r["target_nfe"] for r in result["runs"]})
    labels = list(dict.fromkeys(r["sampler"] for r in result["runs"]))
    lines = ["| sampler | " + " | ".join(f"{t} NFE" for t in targets) + " |",
             "|---|" + "---:|" * len(targets)]
    for label in labels:
        by_t = {r["target_nfe"]: r for r in result["runs"] if r["sampler"] == label}
        lines.append(f"| {label} | " + " | ".join(_cell(by_t.get(t), key) for t in targets) + " |")
    floor = result["floor"][key]
    lines.append(f"| *floor (two true samples)* | {floor:.4f} |" if key == "sw2"
                 else f"| *floor (two true samples)* | {floor * 1e3:.2f} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = ["# Samplers: sample quality per function evaluation", "",
           "Generated by `benchmarks/samplers.py --write-docs`; the raw figures are in "
           "`benchmarks/samplers-cpu.json`.", "",
           "Each model is trained once through unfog's own path (`unfog.commands.train.train` on the config the CLI "
           "composes) and then sampled with every registered sampler at a budget of function evaluations "
           "(NFE, denoiser calls counted by `Denoiser.nfe`; Heun makes 2 per step but one on the last, so its "
           "budget buys ⌊(NFE + 1)/2⌋ steps and the count actually made is shown in brackets where it differs). "
           "Samples are compared with *fresh* samples of the true distribution:", "",
           "- **sliced W2**: √(mean over 512 random unit directions of the exact 1-D W2² of the projections), "
           "in data units; lower is better;",
           "- **MMD²** (× 10³): unbiased, mean of RBF kernels with bandwidths 0.5, 1 and 2 × the median "
           "pairwise distance of the reference set; 0 is perfect and small negative values are noise.", "",
           "The *floor* is the same distance between two independent true samples of the same size: "
           "differences below it are noise. Every run draws the same per-sample noise (seed "
           f"{report['setup']['seed']}). Samplers whose `spacing` defaults to the `leading` grid points "
           "(which start below t = 1) run with "
           f"`spacing={report['setup'].get('spacing', 'logsnr')}`, the grid DPM-Solver++ and UniPC use by "
           "default, so all samplers visit the same times. The toy2d model predicts `v` (its preset's "
           "choice): the cosine schedule ends at α(1) ≈ 5·10⁻⁵, where an ε-prediction's x̂₀ = (x − σ·ε̂)/α "
           "multiplies the network's error by 2·10⁴ and unclipped 2-D samples from grids that start at "
           "t = 1 blow up. DPM-Solver++ runs as 2M and as 3M. The reference, 1000-step DDPM, is the "
           "canonical chain: every point of the 1000-step training grid (its own default spacing).", "",
           "## Produced by", "", "```bash", report["setup"]["command"], "```", "",
           f"on {m['processor']} ({m['cpu_count']} CPU cores shared with other work, {m['torch_threads']} torch "
           f"threads, sampling on the CPU), torch {m['torch']}, Python {m['python']}, {m['date']}. Wall time "
           f"{report['setup']['seconds'] / 60:.1f} min including training. Timings are not the point here (the cores "
           "were shared); the per-run seconds are in the JSON.", ""]
    for name, result in report["models"].items():
        train = result["train"]
        out += [f"## {name}", "", result["description"] + ".", "",
                f"Model: `unfog train {' '.join(train['overrides'])}` ({train['steps']} steps, "
                f"{train['seconds']:.0f} s of training, final loss {train['final_loss']:.4f}; "
                f"schedule {result['schedule']}, prediction `{result['prediction']}`); EMA weights.", ""]
        if result["max_nfe_all_samplers"] < max(result["nfe_targets"]):
            out += [f"Budgets above {result['max_nfe_all_samplers']} NFE are run only for the reference "
                    f"({REFERENCE}, 1000 steps) to keep the CPU time reasonable "
                    f"(`--{name}-max-nfe`).", ""]
        if result["skipped_samplers"]:
            out += [f"Not run (no `steps` parameter): {', '.join(result['skipped_samplers'])}.", ""]
        out += ["Sliced W2 to the true data:", "", *markdown_table(result, "sw2"), "",
                "MMD² × 10³ to the true data:", "", *markdown_table(result, "mmd2"), "",
                _aim_text(result["aim"]), ""]
    out += ["![sliced W2 against NFE](samplers.png)", "",
            "The plot shows sliced W2 against NFE (both axes logarithmic), one line per sampler, "
            f"with the 1000-step {REFERENCE} value (dashed) and the floor (dotted).", ""]
    return "\n".join(out)


def _aim_text(a: dict[str, Any]) -> str:
    if a["met"] is None:
        return ("**Aim** (a second-order sampler at 10–20 NFE within 10 % of 1000-step DDPM): "
                f"not measured ({a['why']}).")
    best = a["best"]
    if best is None:
        return "**Aim**: not measured — no second-order sampler ran at 10 or 20 NFE."
    verdict = "**met**" if a["met"] else "**not met**"
    return (f"**Aim** (a second-order sampler at 10–20 NFE within 10 % of 1000-step {REFERENCE}, sliced W2 "
            f"{a['reference_sw2']:.4f}): {verdict}. Best: {best['sampler']} at {best['nfe']} NFE, "
            f"sliced W2 {best['sw2']:.4f} = {best['ratio']:.2f} × the reference (floor {a['floor_sw2']:.4f})."
            + _mmd_text(a))


def _mmd_text(a: dict[str, Any]) -> str:
    if not a.get("best_mmd2"):
        return ""
    value, sampler, nfe = a["best_mmd2"]
    return (f" By MMD² the best second-order sampler at 10–20 NFE is {sampler} at {nfe} NFE with "
            f"{value * 1e3:.3f} × 10⁻³ against the reference's {a['reference_mmd2'] * 1e3:.3f} × 10⁻³ "
            f"(floor {a['floor_mmd2'] * 1e3:.3f} × 10⁻³).")


# ---------------------------------------------------------------------------- plot (Pillow only)

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]


def plot(report: dict[str, Any], path: Path) -> None:
    """Sliced W2 against NFE, log-log, one panel per model, drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=15)
        small = ImageFont.load_default(size=13)
    except TypeError:  # Pillow without FreeType sizes
        font = small = ImageFont.load_default()
    models = list(report["models"].items())
    labels = list(dict.fromkeys(r["sampler"] for _, res in models for r in res["runs"]))
    colors = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    pw, ph, legend_w = 560, 440, 230
    img = Image.new("RGB", (pw * len(models) + legend_w, ph), "white")
    draw = ImageDraw.Draw(img)
    for i, (name, res) in enumerate(models):
        _panel(draw, (i * pw, 0, pw, ph), name, res, colors, font, small)
    x0, y = pw * len(models) + 10, 50
    for label in labels:
        draw.line([(x0, y + 8), (x0 + 28, y + 8)], fill=colors[label], width=3)
        draw.text((x0 + 36, y), label, fill="black", font=small)
        y += 22
    for text, dash in ((f"{REFERENCE} 1000 NFE", 10), ("floor", 3)):
        _hline(draw, x0, x0 + 28, y + 8, "black", dash)
        draw.text((x0 + 36, y), text, fill="black", font=small)
        y += 22
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _panel(draw: Any, box: tuple[int, int, int, int], name: str, res: dict[str, Any], colors: dict[str, str],
           font: Any, small: Any) -> None:
    runs = [r for r in res["runs"] if "sw2" in r and math.isfinite(r["sw2"])]
    if not runs:
        return
    ref = reference_run(res)
    lines = {label: [(r["nfe"], r["sw2"]) for r in runs if r["sampler"] == label] for label in colors}
    marks = ([(ref["sw2"], 10)] if ref is not None else []) + [(res["floor"]["sw2"], 3)]
    log_panel(draw, box, f"{name}: sliced W2 to the true data", "function evaluations (log)",
              sorted({r["target_nfe"] for r in runs}), lines, colors, marks, font, small)


def log_panel(draw: Any, box: tuple[int, int, int, int], title: str, xlabel: str, xticks: Sequence[float],
              lines: dict[str, list[tuple[float, float]]], colors: dict[str, str],
              marks: Sequence[tuple[float, int]], font: Any, small: Any) -> None:
    """A log-log panel: one polyline per label of ``lines`` ((x, y) points, y > 0) and dashed
    horizontal ``marks`` (value, dash length)."""
    left, top, w, h = box
    ml, mr, mt, mb = 70, 15, 40, 55
    points = [p for pts in lines.values() for p in pts if p[1] > 0 and math.isfinite(p[1])]
    if not points:
        return
    xs = [x for x, _ in points] + list(xticks)
    ys = [y for _, y in points] + [v for v, _ in marks if v > 0]
    lx0, lx1 = math.log10(min(xs)) - 0.1, math.log10(max(xs)) + 0.1
    ly0, ly1 = math.log10(min(ys)) - 0.1, math.log10(max(ys)) + 0.1
    X0, X1, Y0, Y1 = left + ml, left + w - mr, top + h - mb, top + mt

    def px(x: float) -> float:
        return X0 + (math.log10(x) - lx0) / (lx1 - lx0) * (X1 - X0)

    def py(v: float) -> float:
        return Y0 + (math.log10(v) - ly0) / (ly1 - ly0) * (Y1 - Y0)

    draw.rectangle([X0, Y1, X1, Y0], outline="black")
    draw.text((left + ml, top + 10), title, fill="black", font=font)
    for t in xticks:
        draw.line([(px(t), Y0), (px(t), Y0 + 5)], fill="black")
        draw.text((px(t) - 8, Y0 + 8), f"{t:g}", fill="black", font=small)
    draw.text((X0 + (X1 - X0) / 2 - 90, Y0 + 30), xlabel, fill="black", font=small)
    for e in range(math.floor(ly0), math.ceil(ly1) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**e
            if ly0 <= math.log10(v) <= ly1:
                draw.line([(X0 - 5, py(v)), (X1, py(v))], fill="#e6e6e6" if m != 1 else "#c8c8c8")
                draw.line([(X0 - 5, py(v)), (X0, py(v))], fill="black")
                draw.text((left + 8, py(v) - 8), f"{v:g}", fill="black", font=small)
    for value, dash in marks:
        if value > 0:
            _hline(draw, X0, X1, py(value), "black", dash)
    for label, color in colors.items():
        pts = sorted(p for p in lines.get(label, []) if p[1] > 0 and math.isfinite(p[1]))
        if not pts:
            continue
        xy = [(px(a), py(b)) for a, b in pts]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)


def _hline(draw: Any, x0: float, x1: float, y: float, color: str, dash: int) -> None:
    x = x0
    while x < x1:
        draw.line([(x, y), (min(x + dash, x1), y)], fill=color, width=2)
        x += 2 * dash


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(MODELS), action="append", help="run only this model (repeatable)")
    p.add_argument("--nfe", type=int, nargs="+", default=list(NFE_TARGETS), help="evaluation budgets")
    p.add_argument("--samples", type=int, default=2000,
                   help="generated and true samples per toy2d distance (digits: at most its test split)")
    p.add_argument("--digits-max-nfe", type=int, default=100,
                   help="budgets above this run only the reference (ddpm at 1000) on digits")
    p.add_argument("--toy2d-max-nfe", type=int, default=None,
                   help="budgets above this run only the reference on toy2d (default: every budget)")
    p.add_argument("--train-steps", type=int, default=None, help="override trainer.max_steps of both models")
    p.add_argument("--projections", type=int, default=512)
    p.add_argument("--spacing", default="logsnr",
                   help="time grid for samplers whose spacing defaults to the leading grid points")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise and of the true samples")
    p.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "samplers",
                   help="trained models are cached here and reused")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "samplers-cpu.json")
    p.add_argument("--write-docs", action="store_true", help="write docs/samplers.md and docs/samplers.png")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 avoids thrashing when other work shares the cores)")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="do not run: merge these JSON reports (e.g. of parallel --only runs) into --json")
    args = p.parse_args(argv)
    command = "python benchmarks/samplers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.merge:
        return write(merge_reports(args.merge, command.strip()), args.json, args.write_docs)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    start = time.perf_counter()
    models = {}
    for name in args.only or list(MODELS):
        overrides = MODELS[name] + ([f"trainer.max_steps={args.train_steps}"] if args.train_steps else [])
        checkpoint, record = trained_checkpoint(name, overrides, args.workdir)
        task = load_task(name, checkpoint, args.samples, args.seed)
        distances = Distances(task.reference, args.projections, args.seed)
        max_nfe = args.digits_max_nfe if name == "digits" else (args.toy2d_max_nfe or max(args.nfe))
        result = run_task(task, args.nfe, max_nfe, distances, args.seed, args.spacing)
        result["train"] = record
        result["aim"] = aim(result)
        models[name] = result
        print(f"[{name}] {_aim_text(result['aim'])}", flush=True)
    setup = {"command": command.strip(), "nfe": args.nfe, "samples": args.samples, "projections": args.projections,
             "seed": args.seed, "spacing": args.spacing, "digits_max_nfe": args.digits_max_nfe,
             "seconds": round(time.perf_counter() - start)}
    report = {"setup": setup, "machine": machine(), "models": models}
    write(report, args.json, args.write_docs)


def write(report: dict[str, Any], path: Path, docs: bool) -> None:
    """The JSON report, and docs/samplers.md + docs/samplers.png if ``docs`` (else the markdown to stdout)."""
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    if docs:
        (ROOT / "docs" / "samplers.md").write_text(markdown(report))
        plot(report, ROOT / "docs" / "samplers.png")
        print("wrote docs/samplers.md and docs/samplers.png")
    else:
        print(markdown(report))


def merge_reports(paths: Sequence[Path], command: str = "") -> dict[str, Any]:
    """One report from several (each run with ``--only``): models joined, commands and times listed."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    setup = dict(reports[0]["setup"])
    setup["command"] = "\n".join([*(r["setup"]["command"] + " &" for r in reports), "wait", command])
    setup["seconds"] = max(r["setup"]["seconds"] for r in reports)  # run side by side
    models = {k: v for r in reports for k, v in r["models"].items()}
    for result in models.values():
        result["aim"] = aim(result)
    return {"setup": setup, "machine": reports[0]["machine"], "models": models}


if __name__ == "__main__":
    main()
