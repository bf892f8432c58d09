"""Trackers: tensorboard and mlflow (a local file store) get every logged step and the recipe."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import rundir
from harness.metrics import MetricsError, check_trackers, drop_metrics_after, flat_config
from harness.recipe import RecipeError, load_recipe
from harness.train import train
from tests.conftest import in_repo


@pytest.fixture(autouse=True)
def _env(session_cache, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, cache) -> Path:
    output = tmp_path_factory.mktemp("tracked") / "run"
    with in_repo(cache) as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        train(load_recipe("recipes/tiny_cpu.toml", [f"train.output_dir=\"{output}\"", "train.max_steps=3",
                                                     "data.max_seq_length=256",
                                                     "train.report_to=[\"tensorboard\", \"mlflow\"]"]))
    return output


def logged_losses(output: Path) -> list[float]:
    lines = (output / rundir.METRICS_FILE).read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def test_tensorboard_gets_every_step_and_the_recipe(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = list((tracked_run / "tensorboard").glob("*/events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    scalars = accumulator.Scalars("loss")
    assert [s.step for s in scalars] == [1, 2, 3]
    assert [s.value for s in scalars] == pytest.approx(logged_losses(tracked_run), rel=1e-6)
    [hparams] = list((tracked_run / "tensorboard").glob("*/*/hparams.yml"))
    assert "train.lr: 0.002" in hparams.read_text()


def test_mlflow_file_store_gets_every_step_and_the_recipe(tracked_run):
    import os

    import mlflow

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=(tracked_run / "mlruns").resolve().as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "run"]
    [run] = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(logged_losses(tracked_run), rel=1e-6)
    assert run.data.params["train.lr"] == "0.002" and run.data.params["adapter.r"] == "8"


def test_an_unknown_tracker_is_refused_at_load():
    with pytest.raises(RecipeError, match=r"train.report_to\[0\] = 'tensorbord'.*Did you mean 'tensorboard'"):
        load_recipe("recipes/tiny_cpu.toml", ["train.report_to=[\"tensorbord\"]"])


def test_a_missing_tracker_package_gives_the_pip_command(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(MetricsError, match="pip install wandb"):
        check_trackers(["tensorboard", "wandb"])


def test_flat_config_and_dropping_retrained_steps(tmp_path):
    assert flat_config({"train": {"lr": 0.1, "report_to": ["mlflow"]}}) == {"train.lr": 0.1,
                                                                           "train.report_to": '["mlflow"]'}
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
    drop_metrics_after(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
