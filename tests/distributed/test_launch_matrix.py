"""Every engine under every launcher: the same 2 steps of the tiny recipe, or one clear refusal.

Launchers: python, accelerate launch (1 process and --multi_gpu 2), torchrun (2) and deepspeed
(1 and 2). Engines: accelerate, and deepspeed with ZeRO-2 + CPU optimizer offload (the paper's
single-V100 set-up). One-process launches accumulate 2 micro-batches, two-process ones 1 per
rank: the same 2 sequences per optimizer step, so every loss curve must equal the reference of
`python` + accelerate (dropout off; fp32 over gloo, float rounding only). None refuses: the deepspeed engine forms a
group of one itself where no launcher did (`python`, one-process `accelerate launch`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

VENV_BIN = Path(sys.executable).parent
COMMON = ["train.max_steps=2", "adapter.dropout=0.0", "data.max_seq_length=256"]
ENGINES = {
    "accelerate": [],
    "deepspeed": ["engine.name=\"deepspeed\"", "engine.deepspeed_config=\"launch/deepspeed/zero2_offload.json\""],
}


def launchers() -> dict[str, tuple[list[str], int]]:
    """name -> (command before the script, processes)."""
    accelerate = [str(VENV_BIN / "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no"]
    return {
        "python": ([sys.executable], 1),
        "accelerate-1": ([*accelerate, "--num_processes", "1", "--cpu"], 1),
        "accelerate-2": ([*accelerate, "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port()], 2),
        "torchrun-2": ([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", free_port()], 2),
        "deepspeed-1": ([str(VENV_BIN / "deepspeed"), "--num_gpus", "1", "--master_port", free_port()], 1),
        "deepspeed-2": ([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", free_port()], 2),
    }


def run(launcher: list[str], processes: int, engine: str, output_dir: Path, cache: Path):
    env = {**os.environ, "HARNESS_CACHE": str(cache), "COLUMNS": "300", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [*launcher, "launch/train.py", "recipes/tiny_cpu.toml", f"train.output_dir=\"{output_dir}\"", *COMMON,
               f"train.grad_accum={2 // processes}", *ENGINES[engine]]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("reference")
    result = run([sys.executable], 1, "accelerate", base / "run", base / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(base / "run"), base / "cache"


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("name", sorted(launchers()))
def test_every_engine_under_every_launcher(reference, tmp_path, name, engine):
    curve, cache = reference
    launcher, processes = launchers()[name]
    result = run(launcher, processes, engine, tmp_path / "run", cache)
    ours = [line for line in result.stderr.splitlines() if "launch/train.py: error:" in line]
    causes = [line for line in result.stderr.splitlines() if "Error" in line and "Warning" not in line]
    assert result.returncode == 0, "\n".join(ours + causes[-10:]) or result.stderr[-5000:]  # every combination runs
    assert losses(tmp_path / "run") == pytest.approx(curve, abs=1e-5), result.stderr[-3000:]
