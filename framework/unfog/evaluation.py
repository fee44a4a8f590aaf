"""Scoring samples with registered metrics, recording how each number was made.

Used by ``unfog evaluate`` (a pipeline → samples → a JSON result with its whole protocol),
``unfog sample metric=...`` and :class:`unfog.callbacks.MetricCallback` (metrics while
training). A metric may take its real reference from the training data
(:class:`~unfog.protocols.MetricReference`; reference features are cached by the metric) and
describe its feature extractor and reference (:class:`~unfog.protocols.MetricProtocol`).
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unfog import registry
from unfog.config import NAME_KEY, build, params_of, plain
from unfog.errors import ConfigError
from unfog.pipeline import Pipeline
from unfog.protocols import Metric, MetricProtocol, MetricReference, Sampler
from unfog.sampling import captions_of, dataset_examples, labels_of, requested_values
from unfog.schemas import SamplingSettings
from unfog.util import resolve_device, sha256_of, versions


def with_extractor(nodes: Mapping[str, Any] | None, extractor: str | None,
                   weights: str | None) -> dict[str, Any]:
    """Metric nodes with ``extractor`` and ``weights`` set in every metric that has those fields
    (``extractor=classifier extractor_weights=DIR`` instead of one pair per metric)."""
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
        if isinstance(metric, MetricReference):
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
        if isinstance(metric, MetricProtocol):
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
    """Whether callable ``fn`` takes a keyword argument ``name`` (a metric's ``update`` that
    takes ``captions`` gets the prompts the samples were drawn for)."""
    return name in inspect.signature(fn).parameters


@dataclass
class EvaluateResult:
    """What ``unfog evaluate`` measured and where it wrote it."""

    results: dict[str, dict[str, float]]
    record: dict[str, Any]
    path: Path


def evaluate(cfg: Mapping[str, Any], out_dir: Path) -> EvaluateResult:
    """Draw ``num_samples`` from a pipeline and score them with every chosen metric.

    The reference of metrics that need real data is the checkpoint's training dataset
    (``dataset=...`` in this command's config replaces it). Conditioning follows ``unfog
    sample``: ``labels``/``prompt(s)``/``values`` when given; otherwise labels cycle over the
    classes and captions or images come from evenly spaced rows of the reference dataset.
    Writes ``evaluation.json``: the results and the protocol that produced them.
    """
    import datetime
    import platform

    import unfog
    from unfog.schemas import EvaluateConfig, check_config

    check_config(cfg, EvaluateConfig)
    if not cfg.get("metrics"):
        raise ConfigError("unfog evaluate needs at least one metric: add metric=fid,kid (see `unfog list metric`).")
    settings = SamplingSettings.of(cfg)
    nodes = with_extractor(cfg["metrics"], cfg.get("extractor"), cfg.get("extractor_weights"))
    metrics = build_metrics(nodes)
    sampler: Sampler = build("sampler", cfg["sampler"])
    device = resolve_device(cfg["device"])
    pipeline = Pipeline.load(cfg["checkpoint"], use_ema=cfg["use_ema"])
    pipeline.check(settings)
    dataset_cfg = plain(cfg.get("dataset")) or pipeline.config["dataset"]
    dataset = build("dataset", dataset_cfg)
    if tuple(dataset.data_shape) != tuple(pipeline.data_shape):
        raise ConfigError(f"the reference dataset {dataset_cfg.get('_name_')} gives shape {tuple(dataset.data_shape)} "
                          f"but the model generates {tuple(pipeline.data_shape)}; choose a matching dataset=.")
    n = int(cfg["num_samples"])
    conditioners = pipeline.conditioners
    examples = dataset_examples(dataset, n, [c.field for c in conditioners.values()])
    values = requested_values(conditioners, n, cfg, examples)
    start = time.perf_counter()
    set_references(metrics, dataset, dataset_cfg)
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    samples = pipeline.to(device).generate(sampler, n, values, settings, progress=True)
    sampling_seconds = time.perf_counter() - start
    start = time.perf_counter()
    results = score(metrics, samples, labels_of(conditioners, values), captions_of(conditioners, values))
    metric_seconds = time.perf_counter() - start
    described = pipeline.describe()
    record = {
        "results": results,
        "protocol": {
            "checkpoint": str(cfg["checkpoint"]),
            "checkpoint_sha256": described.get("sha256") or sha256_of(cfg["checkpoint"]),
            "weights": "ema" if cfg["use_ema"] else "raw",
            "pipeline": described,
            "num_samples": n,
            "seed": settings.seed,
            "seeds": f"sample k starts from its own noise stream seeded by ({settings.seed}, k), k = 0..{n - 1}",
            "sampler": plain(cfg["sampler"]),
            "schedule": pipeline.config.get("schedule"),
            "prediction": pipeline.config.get("prediction"),
            "guidance": settings.guidance,
            "guidance_rescale": settings.guidance_rescale,
            "guidance_interval": settings.guidance_interval,
            "clip": bool(settings.clip and pipeline.data_range),
            "conditioning": _conditioning_record(conditioners, cfg),
            "reference_dataset": dataset_cfg,
            "metrics": protocols(metrics, nodes),
            "versions": {**versions(), **pipeline.versions, "unfog": unfog.__version__},
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


def _conditioning_record(conditioners: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    if not len(conditioners):
        return None
    given = {k: plain(cfg.get(k)) for k in ("labels", "prompt", "prompts", "values") if cfg.get(k)}
    if given:
        return {"given": given, "cycled": True}
    return {"default": "labels cycle over the classes; other fields from evenly spaced reference rows"}
