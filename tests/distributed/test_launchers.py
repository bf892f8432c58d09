"""Every launcher on the CPU with 2 ranks over gloo: the same loss curve as one process.

1 process x accumulation 2, accelerate DDP 2 ranks x 1, torchrun 2 ranks x 1 and DeepSpeed
ZeRO-2 with CPU optimizer offload 2 ranks x 1 read the same samples per optimizer step (the
data order slices each global batch across ranks), so their loss curves agree to float
rounding (1e-5 here). Dropout is off so that the per-rank RNG streams do not matter.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

VENV_BIN = Path(sys.executable).parent
COMMON = ["train.max_steps=3", "adapter.dropout=0.0", "data.max_seq_length=256"]


def run(launcher: list[str], output_dir: Path, *overrides: str, cache: Path) -> list[float]:
    env = {**os.environ, "HARNESS_CACHE": str(cache), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [*launcher, "launch/train.py", "recipes/tiny_cpu.toml", f"train.output_dir=\"{output_dir}\"",
               *COMMON, *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, accumulation 2."""
    base = tmp_path_factory.mktemp("single")
    curve = run([sys.executable], base / "run", "train.grad_accum=2", cache=base / "cache")
    return curve, base / "cache"


def test_accelerate_ddp_matches_one_process(reference, tmp_path):
    curve, cache = reference
    launcher = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    ddp = run(launcher, tmp_path / "run", "train.grad_accum=1", cache=cache)
    assert ddp == pytest.approx(curve, abs=1e-5)


def test_torchrun_matches_one_process(reference, tmp_path):
    curve, cache = reference
    launcher = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29533"]
    assert run(launcher, tmp_path / "run", "train.grad_accum=1", cache=cache) == pytest.approx(curve, abs=1e-5)


@pytest.mark.skipif(shutil.which("ninja", path=str(VENV_BIN)) is None and shutil.which("ninja") is None,
                    reason="DeepSpeed's CPU Adam is JIT-built and needs ninja (installed with the harness)")
def test_deepspeed_zero2_offload_matches_one_process(reference, tmp_path):
    curve, cache = reference
    launcher = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29534"]
    ds = run(launcher, tmp_path / "run", "train.grad_accum=1", "engine.name=\"deepspeed\"",
             "engine.deepspeed_config=\"launch/deepspeed/zero2_offload.json\"", cache=cache)
    assert ds == pytest.approx(curve, abs=1e-5)


@pytest.mark.slow
def test_deepspeed_zero3_trains_and_exports_a_full_adapter(reference, tmp_path):
    from safetensors.torch import load_file

    _, cache = reference
    launcher = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29535"]
    run(launcher, tmp_path / "run", "train.grad_accum=1", "engine.name=\"deepspeed\"",
        "engine.deepspeed_config=\"launch/deepspeed/zero3.json\"", "quantization.name=\"none\"", cache=cache)
    weights = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    assert weights and all(t.numel() > 0 for t in weights.values())  # ZeRO-3 shards never export empty
