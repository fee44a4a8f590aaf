"""Scoring samples with registered metrics, recording how each number was made.

Used by ``unfog evaluate`` (a checkpoint → samples → a JSON result with its whole protocol),
``unfog sample metric=...`` and :class:`unfog.callbacks.MetricCallback` (metrics while
training). A metric may define ``set_reference(dataset, dataset_config)``, to take its real
reference from the training data (reference features are cached by the metric), and
``protocol()``, a JSON-able description of its feature extractor and reference.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unfog.config import build, plain
from unfog.errors import ConfigError
from unfog.protocols import Metric


def with_extractor(nodes: Mapping[str, Any] | None, extractor: str | None,
                   weights: str | None) -> dict[str, Any]:
    """Metric nodes with ``extractor`` and ``weights`` set in every metric that has those fields
    (``extractor=classifier extractor_weights=DIR`` instead of one pair per metric)."""
    from unfog import registry
    from unfog.config import NAME_KEY, params_of

    out = {}
    for name, node in (plain(nodes) or {}).items():
        node = dict(node)
        fields = {p.name for p in params_of(registry.get("metric", node[NAME_KEY]).obj)}
        if extractor is not None and "extractor" in fields:
            node["extractor"] = extractor
        if weights is not None and "weights" in fields:
            node["weights"] = weights
        out[name] = node
    return out


def build_metrics(nodes: Mapping[str, Any] | None) -> dict[str, Metric]:
    """The metrics of a ``metrics: {NAME: node}`` config section, built in order."""
    return {name: build("metric", node) for name, node in (plain(nodes) or {}).items() if node is not None}


def set_references(metrics: Mapping[str, Metric], dataset: Any, dataset_config: Mapping[str, Any]) -> None:
    """Hand the training data to every metric that takes its reference from it."""
    for metric in metrics.values():
        if hasattr(metric, "set_reference"):
            metric.set_reference(dataset, dict(plain(dataset_config)))


def score(metrics: Mapping[str, Metric], samples: torch.Tensor, labels: torch.Tensor | None = None,
          captions: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Every metric's result on ``samples`` (reset first, so a metric can be scored again)."""
    results = {}
    for name, metric in metrics.items():
        metric.reset()
        extra = {"captions": captions} if captions is not None and accepts(metric.update, "captions") else {}
        metric.update(generated=samples, labels=labels, **extra)
        results[name] = {k: float(v) for k, v in metric.compute().items()}
    return results


def protocols(metrics: Mapping[str, Metric], nodes: Mapping[str, Any]) -> dict[str, Any]:
    """How each metric makes its number: its config node and, when it says, its extractor and reference."""
    nodes = plain(nodes) or {}
    out = {}
    for name, metric in metrics.items():
        entry = {"config": nodes.get(name)}
        if hasattr(metric, "protocol"):
            entry |= metric.protocol()
        out[name] = entry
    return out


def flat(results: Mapping[str, Mapping[str, float]], prefix: str = "") -> dict[str, float]:
    """``{metric: {key: value}}`` as ``{prefix + metric/key: value}`` (names for loggers)."""
    return {f"{prefix}{name}/{key}": value for name, values in results.items() for key, value in values.items()}


def table(results: Mapping[str, Mapping[str, float]]) -> str:
    """The results as an aligned text table: metric, value name, value."""
    rows = [(name, key, f"{value:.6g}") for name, values in results.items() for key, value in values.items()]
    if not rows:
        return ""
    head = ("metric", "quantity", "value")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([line.format(*head).rstrip(), *(line.format(*r).rstrip() for r in rows)])


def accepts(fn: Any, name: str) -> bool:
    """Whether callable ``fn`` takes a keyword argument ``name``."""
    import inspect

    return name in inspect.signature(fn).parameters


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file (or of every file of a folder, in name order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass
class EvaluateResult:
    """What ``unfog evaluate`` measured and where it wrote it."""

    results: dict[str, dict[str, float]]
    record: dict[str, Any]
    path: Path


def evaluate(cfg: Mapping[str, Any], out_dir: Path) -> EvaluateResult:
    """Draw ``num_samples`` from a checkpoint and score them with every chosen metric.

    The reference of metrics that need real data is the checkpoint's training dataset
    (``dataset=...`` in this command's config replaces it). Conditioning follows ``unfog
    sample``: ``labels``/``prompt(s)``/``values`` when given; otherwise labels cycle over the
    classes and captions or images come from evenly spaced rows of the reference dataset.
    Writes ``evaluation.json``: the results and the protocol that produced them.
    """
    import datetime
    import platform

    import unfog
    from unfog.run import captions_of, device_of, labels_of, load_checkpoint, sample_values, versions
    from unfog.sampling import dataset_examples, default_values, generate

    if not cfg.get("metrics"):
        raise ConfigError("unfog evaluate needs at least one metric: add metric=fid,kid (see `unfog list metric`).")
    model, schedule, meta = load_checkpoint(cfg["checkpoint"], cfg["use_ema"])
    train_cfg, wiring = meta["config"], meta["wiring"]
    dataset_cfg = plain(cfg.get("dataset")) or train_cfg["dataset"]
    dataset = build("dataset", dataset_cfg)
    if tuple(dataset.data_shape) != tuple(wiring["data_shape"]):
        raise ConfigError(f"the reference dataset {dataset_cfg.get('_name_')} gives shape {tuple(dataset.data_shape)} "
                          f"but the model generates {tuple(wiring['data_shape'])}; choose a matching dataset=.")
    nodes = with_extractor(cfg["metrics"], cfg.get("extractor"), cfg.get("extractor_weights"))
    metrics = build_metrics(nodes)
    sampler = build("sampler", cfg["sampler"])
    n = int(cfg["num_samples"])
    if n < 1:
        raise ConfigError(f"num_samples must be at least 1; got {n}.")
    device = device_of(cfg["device"])
    model.to(device)
    guidance = plain(cfg["guidance"])
    model.guidance_plan(guidance)
    start = time.perf_counter()
    set_references(metrics, dataset, dataset_cfg)
    reference_seconds = time.perf_counter() - start
    given = any(cfg.get(k) for k in ("labels", "prompt", "prompts", "values"))
    if given or not len(model.conditioners):
        values = sample_values(model, n, cfg)
    else:  # conditioning drawn as the reference data is: classes in turn, captions of its rows
        values = default_values(model, n, dataset_examples(dataset, n, model.fields))
    clip = tuple(wiring["data_range"]) if cfg["clip"] and wiring["data_range"] else None
    start = time.perf_counter()
    samples = generate(model, schedule, sampler, train_cfg["prediction"], wiring["data_shape"], range(n),
                       seed=cfg["seed"], values=values, guidance=guidance, clip=clip, batch_size=cfg["batch_size"],
                       device=device, sigma_data=train_cfg.get("sigma_data"), progress=True,
                       guidance_rescale=cfg["guidance_rescale"], guidance_interval=plain(cfg["guidance_interval"]))
    sampling_seconds = time.perf_counter() - start
    start = time.perf_counter()
    results = score(metrics, samples, labels_of(model, values), captions_of(model, values))
    metric_seconds = time.perf_counter() - start
    checkpoint = Path(cfg["checkpoint"])
    record = {
        "results": results,
        "protocol": {
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": sha256_of(checkpoint),
            "weights": "ema" if cfg["use_ema"] else "raw",
            "num_samples": n,
            "seed": cfg["seed"],
            "seeds": f"sample k starts from its own noise stream seeded by ({cfg['seed']}, k), k = 0..{n - 1}",
            "sampler": plain(cfg["sampler"]),
            "schedule": train_cfg["schedule"],
            "prediction": train_cfg["prediction"],
            "guidance": guidance,
            "guidance_rescale": cfg["guidance_rescale"],
            "guidance_interval": plain(cfg["guidance_interval"]),
            "clip": bool(clip),
            "conditioning": _conditioning_record(model, cfg),
            "reference_dataset": dataset_cfg,
            "metrics": protocols(metrics, nodes),
            "versions": {**versions({}), **meta.get("versions", {}), "unfog": unfog.__version__},
            "plugins": {p.distribution: p.version for p in unfog.plugins() if p.distribution},
            "device": str(device),
            "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "seconds": {"reference": round(reference_seconds, 2), "sampling": round(sampling_seconds, 2),
                    "metrics": round(metric_seconds, 2)},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "evaluation.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return EvaluateResult(results, record, path)


def _conditioning_record(model: Any, cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    if not len(model.conditioners):
        return None
    given = {k: plain(cfg.get(k)) for k in ("labels", "prompt", "prompts", "values") if cfg.get(k)}
    if given:
        return {"given": given, "cycled": True}
    return {"default": "labels cycle over the classes; other fields from evenly spaced reference rows"}
