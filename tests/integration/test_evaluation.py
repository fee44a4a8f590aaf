"""``unfog evaluate`` and metrics while training, through the real CLI on tiny configs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from _cli import TINY, run
from hydra import compose, initialize_config_dir

from unfog.commands import conf_dir, split_metrics
from unfog.commands.sample import sample
from unfog.config import register_configs
from unfog.errors import ConfigError
from unfog.evaluation import evaluate


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step digits run that scores its EMA model every 3 steps, FID in a classifier's features."""
    from unfog_metrics.classifier import train_classifier

    root = tmp_path_factory.mktemp("train")
    train_classifier({"dataset": {"_name_": "digits"}, "steps": 5, "width": 4, "device": "cpu"}, root / "cls")
    run("train", *TINY, "trainer.max_steps=6", "sampling.every_n_steps=0", "metric=[digits_classifier,fid]",
        "evaluation.extractor=classifier", f"evaluation.extractor_weights={root / 'cls'}",
        "evaluation.every_n_steps=3", "evaluation.num_samples=20", f"hydra.run.dir={root}", cwd=root,
        env={"UNFOG_CACHE": str(root / "cache")})
    return root


def test_training_scores_the_ema_model_every_n_steps_and_at_the_end(trained: Path) -> None:
    lines = [json.loads(line) for line in (trained / "evaluation.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [3, 6]
    assert all(line["results"]["digits_classifier"]["n"] == 20 for line in lines)
    assert all(line["results"]["fid"]["fid"] > 0 for line in lines)
    logged = (trained / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"eval/digits_classifier/accuracy", "eval/digits_classifier/per_class_min", "eval/fid/fid"} <= set(logged)


ALL = "metric=digits_classifier,fid,kid,precision_recall,inception_score,class_accuracy"


def test_evaluate_writes_results_with_the_whole_protocol(trained: Path, tmp_path: Path) -> None:
    # An in-domain feature extractor, trained by unfog, stands in for Inception (no download here).
    cache = {"UNFOG_CACHE": str(tmp_path / "cache")}
    run("train-classifier", "steps=20", "width=4", f"output_dir={tmp_path / 'cls'}", cwd=tmp_path)
    ckpt = trained / "checkpoints" / "last.ckpt"
    common = [f"checkpoint={ckpt}", "num_samples=30", "sampler=ddpm", "sampler.steps=4", "guidance=2", "seed=3",
              "extractor=classifier", f"extractor_weights={tmp_path / 'cls'}"]
    out = run("evaluate", *common, ALL, f"output_dir={tmp_path / 'first'}", cwd=tmp_path, env=cache)
    record = json.loads((tmp_path / "first" / "evaluation.json").read_text())
    r = record["results"]
    assert r["digits_classifier"]["n"] == r["class_accuracy"]["n"] == 30
    assert r["fid"]["fid"] > 0 and r["kid"]["kid_std"] >= 0 and 0 <= r["precision_recall"]["recall"] <= 1
    assert 1 <= r["inception_score"]["inception_score"] <= 10
    p = record["protocol"]
    assert p["num_samples"] == 30 and p["seed"] == 3 and p["guidance"] == 2 and p["weights"] == "ema"
    assert p["sampler"]["_name_"] == "ddpm" and p["sampler"]["steps"] == 4
    assert p["reference_dataset"]["_name_"] == "digits" and p["versions"]["unfog"] and p["versions"]["torch"]
    assert len(p["checkpoint_sha256"]) == 64
    fid = p["metrics"]["fid"]
    weights = (tmp_path / "cls" / "classifier.safetensors").read_bytes()
    assert fid["feature_extractor"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert fid["reference"]["source"] == "dataset" and fid["reference"]["cached"] is False
    assert "inception_score" in out.stdout and "precision" in out.stdout  # the printed table

    # The same protocol gives the same numbers (every sample has its own seeded noise), and the
    # reference features computed by the first run are read back from the cache.
    os.environ["UNFOG_CACHE"] = cache["UNFOG_CACHE"]
    try:
        again = evaluate(_cfg(*common, "metric=[digits_classifier,fid,kid,precision_recall,inception_score,"
                                       "class_accuracy]"), tmp_path / "again")
    finally:
        del os.environ["UNFOG_CACHE"]
    assert again.results == record["results"]
    assert again.record["protocol"]["metrics"]["fid"]["reference"]["cached"] is True


def test_evaluate_without_a_metric_says_how_to_choose_one(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="metric=fid,kid"):
        evaluate(_cfg(f"checkpoint={trained / 'checkpoints' / 'last.ckpt'}", "num_samples=2"), tmp_path)


def test_a_comma_list_of_metrics_is_a_list_unless_sweeping() -> None:
    assert split_metrics(["metric=fid,kid", "num_samples=5"]) == ["metric=[fid,kid]", "num_samples=5"]
    assert split_metrics(["metric=[fid,kid]"]) == ["metric=[fid,kid]"]
    assert split_metrics(["-m", "metric=fid,kid"]) == ["-m", "metric=fid,kid"]


def test_sample_scores_with_a_list_of_metrics(trained: Path, tmp_path: Path) -> None:
    cfg = _cfg(f"checkpoint={trained / 'checkpoints' / 'last.ckpt'}", "metric=[digits_classifier]", "num_samples=10",
               "sampler.steps=3", name="sample")
    result = sample(cfg, tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["results"] == result.metrics and result.metrics["digits_classifier"]["n"] == 10


def _cfg(*overrides: str, name: str = "evaluate"):  # noqa: ANN202
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))
