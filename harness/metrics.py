"""Where a run's metrics go: <output_dir>/metrics.jsonl, and the trackers of train.report_to.

    metrics = MetricsLog(output_dir, ["tensorboard", "mlflow"], recipe, enabled=rank == 0)
    metrics.write({"step": 3, "loss": 2.1, ...})
    metrics.close()

metrics.jsonl holds one JSON object per logged step and is the record the harness itself reads
(resume drops the steps it trains again). The trackers are accelerate's (accelerate.tracking),
driven directly so that both engines use them the same way, on rank 0 only; each run logs its
resolved recipe as its config:

    tensorboard  <output_dir>/tensorboard/<run name>
    mlflow       MLFLOW_TRACKING_URI, else a file store in <output_dir>/mlruns (MLFLOW_ALLOW_FILE_STORE)
    wandb        the wandb project <run name>; WANDB_MODE=offline logs without a network
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from harness import atomic, rundir
from harness.errors import HarnessError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}  # name -> pip package
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class MetricsError(HarnessError):
    """A tracker that cannot run here; the message gives the pip command."""


def check_trackers(names: list[str]) -> None:
    """Every tracker of train.report_to is installed (checked before any weights load)."""
    missing = [name for name in names if importlib.util.find_spec(_MODULES[name]) is None]
    if missing:
        packages = " ".join(TRACKERS[name] for name in missing)
        raise MetricsError(f"train.report_to names {', '.join(missing)}, which is not installed: "
                           f"pip install {packages}")


class MetricsLog:
    """metrics.jsonl and the trackers; a no-op on ranks other than 0 (enabled=False)."""

    def __init__(self, output_dir: Path, report_to: list[str], config: dict, *, enabled: bool):
        self.enabled = enabled
        self.trackers = []
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(output_dir / rundir.METRICS_FILE, "a", encoding="utf-8")
            self.trackers = [_start(name, output_dir, config) for name in report_to]

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        values = {key: value for key, value in record.items() if key != "step" and value is not None}
        for tracker in self.trackers:
            tracker.log(values, step=record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            for tracker in self.trackers:
                tracker.finish()


def _start(name: str, output_dir: Path, config: dict):
    from accelerate import tracking

    run_name = output_dir.resolve().name
    if name == "tensorboard":
        tracker = tracking.TensorBoardTracker(run_name, output_dir / "tensorboard")
    elif name == "mlflow":
        tracker = tracking.MLflowTracker(experiment_name=run_name, run_name=run_name)
        _default_mlflow_store(output_dir)
    else:
        tracker = tracking.WandBTracker(run_name)
    tracker.main_process_only = False  # only rank 0 creates trackers; no accelerate state needed
    tracker.start()
    tracker.store_init_configuration(flat_config(config))
    return tracker


def _default_mlflow_store(output_dir: Path) -> None:
    import os

    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        # MLflow 3 keeps its file store only on request; a run directory needs no database server.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())


def flat_config(tables: dict) -> dict:
    """{"train.lr": 0.0002, ...}: scalars as they are, lists and tables as JSON text (what
    tensorboard's hparams and mlflow's params accept)."""
    return {f"{table}.{key}": value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for table, values in tables.items() for key, value in values.items()}


def read_step_records(path: Path) -> list[dict]:
    """The training-step records of a metrics.jsonl (evaluation records left out). Runs written
    before the memory key named its unit call it peak_memory_gb (it always held GiB)."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [r for r in records if "tokens_per_s" in r]
    for step in steps:
        if "peak_memory_gb" in step:
            step["peak_memory_gib"] = step.pop("peak_memory_gb")
    return steps


def drop_metrics_after(path: Path, step: int) -> None:
    """Drop the records of steps after `step` (they are trained again after a resume)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
             if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic.write_text(path, "".join(lines))
