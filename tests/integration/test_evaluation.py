"""``unfog evaluate`` and metrics while training, through the real CLI on tiny configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _cli import TINY, run
from hydra import compose, initialize_config_dir

from unfog.cli import _metric_lists, conf_dir
from unfog.config import register_configs
from unfog.errors import ConfigError
from unfog.evaluation import evaluate
from unfog.run import sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step digits run that scores its EMA model every 3 steps."""
    root = tmp_path_factory.mktemp("train")
    run("train", *TINY, "trainer.max_steps=6", "sampling.every_n_steps=0", "metric=digits_classifier",
        "evaluation.every_n_steps=3", "evaluation.num_samples=20", f"hydra.run.dir={root}", cwd=root)
    return root


def test_training_scores_the_ema_model_every_n_steps_and_at_the_end(trained: Path) -> None:
    lines = [json.loads(line) for line in (trained / "evaluation.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [3, 6]
    assert all(line["results"]["digits_classifier"]["n"] == 20 for line in lines)
    logged = (trained / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"eval/digits_classifier/accuracy", "eval/digits_classifier/per_class_min"} <= set(logged)


def test_evaluate_writes_results_with_the_whole_protocol(trained: Path, tmp_path: Path) -> None:
    ckpt = trained / "checkpoints" / "last.ckpt"
    out = run("evaluate", f"checkpoint={ckpt}", "metric=digits_classifier", "num_samples=20", "sampler=ddpm",
              "sampler.steps=4", "guidance=2", "seed=3", f"output_dir={tmp_path}", cwd=tmp_path)
    record = json.loads((tmp_path / "evaluation.json").read_text())
    result = record["results"]["digits_classifier"]
    assert set(result) == {"accuracy", "per_class_min", "n"} and result["n"] == 20
    p = record["protocol"]
    assert p["num_samples"] == 20 and p["seed"] == 3 and p["guidance"] == 2
    assert p["sampler"]["_name_"] == "ddpm" and p["sampler"]["steps"] == 4 and p["weights"] == "ema"
    assert p["reference_dataset"]["_name_"] == "digits" and p["versions"]["unfog"] and p["versions"]["torch"]
    assert len(p["checkpoint_sha256"]) == 64 and p["metrics"]["digits_classifier"]["config"]["_name_"]
    assert "digits_classifier" in out.stdout and "accuracy" in out.stdout  # the printed table

    # The same protocol gives the same numbers (every sample has its own seeded noise).
    cfg = _cfg(f"checkpoint={ckpt}", "metric=digits_classifier", "num_samples=20", "sampler=ddpm",
               "sampler.steps=4", "guidance=2", "seed=3")
    assert evaluate(cfg, tmp_path / "again").results == record["results"]


def test_evaluate_without_a_metric_says_how_to_choose_one(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="metric=fid,kid"):
        evaluate(_cfg(f"checkpoint={trained / 'checkpoints' / 'last.ckpt'}", "num_samples=2"), tmp_path)


def test_a_comma_list_of_metrics_is_a_list_unless_sweeping() -> None:
    assert _metric_lists(["metric=fid,kid", "num_samples=5"]) == ["metric=[fid,kid]", "num_samples=5"]
    assert _metric_lists(["metric=[fid,kid]"]) == ["metric=[fid,kid]"]
    assert _metric_lists(["-m", "metric=fid,kid"]) == ["-m", "metric=fid,kid"]


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
