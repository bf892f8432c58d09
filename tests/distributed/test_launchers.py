"""Every launcher on the CPU with 2 ranks over gloo: the same loss curve as one process.

1 process x accumulation 2, accelerate DDP 2 ranks x 1, torchrun 2 ranks x 1 and DeepSpeed
ZeRO-2 with CPU optimizer offload 2 ranks x 1 read the same samples per optimizer step (the
data order slices each global batch across ranks), so their loss curves agree to float
rounding (1e-5 here). DeepSpeed ZeRO-3 (slow) is compared with one unquantized process the
same way. Dropout is off so that the per-rank RNG streams do not matter.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, free_port

VENV_BIN = Path(sys.executable).parent
COMMON = ["train.max_steps=3", "adapter.dropout=0.0", "data.max_seq_length=256"]


def run(launcher: list[str], output_dir: Path, *overrides: str, cache: Path) -> list[float]:
    env = {**os.environ, "HARNESS_CACHE": str(cache), "COLUMNS": "200", "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")])}  # as an activated venv
    env.pop("WORLD_SIZE", None)
    command = [*launcher, "launch/train.py", "recipes/tiny_cpu.toml", f"train.output_dir=\"{output_dir}\"",
               *COMMON, *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, accumulation 2."""
    base = tmp_path_factory.mktemp("single")
    curve = run([sys.executable], base / "run", "train.grad_accum=2", cache=base / "cache")
    return curve, base / "cache"


def test_accelerate_ddp_matches_one_process(reference, tmp_path):
    curve, cache = reference
    launcher = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", free_port()]
    ddp = run(launcher, tmp_path / "run", "train.grad_accum=1", cache=cache)
    assert ddp == pytest.approx(curve, abs=1e-5)


def test_torchrun_matches_one_process(reference, tmp_path):
    curve, cache = reference
    launcher = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", free_port()]
    assert run(launcher, tmp_path / "run", "train.grad_accum=1", cache=cache) == pytest.approx(curve, abs=1e-5)


def test_deepspeed_zero2_offload_matches_one_process(reference, tmp_path):
    # ninja is an install requirement (setup.cfg): without it the harness is broken, not this test.
    assert shutil.which("ninja", path=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")])), (
        "ninja not found: DeepSpeed JIT-builds its CPU Adam with it; it is installed with the harness "
        "(pip install ninja)")
    curve, cache = reference
    launcher = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", free_port()]
    ds = run(launcher, tmp_path / "run", "train.grad_accum=1", "engine.name=\"deepspeed\"",
             "engine.deepspeed_config=\"launch/deepspeed/zero2_offload.json\"", cache=cache)
    assert ds == pytest.approx(curve, abs=1e-5)


@pytest.mark.slow
def test_deepspeed_zero3_matches_one_process_and_exports_a_full_adapter(reference, tmp_path):
    """ZeRO-3 (parameters, gradients and optimizer state sharded over 2 ranks; unquantized, as ZeRO-3
    needs) against one process x accumulation 2 of the same recipe: the same 2 sequences per step.
    Everything is fp32; the runs differ only in how gradients are summed (one process accumulates
    micro-batch 1 then 2, ZeRO-3 reduce-scatters the two ranks' over gloo) and in the order of the
    sharded optimizer's arithmetic: float32 rounding, ~1e-7 relative, that three AdamW steps grow
    to at most ~1e-5 (measured: identical losses, adapter weights within 6e-6 of their scale).
    1e-4 relative leaves room and still catches another batch or a lost or altered update: the
    loss moves by ~1e-2 per step here. The exported adapter must match too (ZeRO-3 holds only
    shards of each weight: an export that skipped gathering them would be empty or wrong)."""
    from safetensors.torch import load_file

    _, cache = reference
    unquantized = ("quantization.name=\"none\"",)
    single = run([sys.executable], tmp_path / "single", "train.grad_accum=2", *unquantized, cache=cache)
    launcher = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", free_port()]
    zero3 = run(launcher, tmp_path / "run", "train.grad_accum=1", "engine.name=\"deepspeed\"",
                "engine.deepspeed_config=\"launch/deepspeed/zero3.json\"", *unquantized, cache=cache)
    assert len(single) == 3 and len(set(single)) == 3  # three distinct steps
    assert zero3 == pytest.approx(single, rel=1e-4)
    weights = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    expected = load_file(str(tmp_path / "single" / "final" / "adapter_model.safetensors"))
    assert weights.keys() == expected.keys() and len(expected) == 2 * 7 * 2  # A, B x 7 projections x 2 layers
    for name, tensor in expected.items():
        assert weights[name].shape == tensor.shape, name
        assert (weights[name] - tensor).abs().max() <= 1e-4 * tensor.abs().max(), name


@pytest.mark.slow  # 29 s; FSDP2's settings and refusals stay in the default suite (tests/backends/test_fsdp.py)
def test_accelerate_fsdp_qlora_matches_one_process_and_resumes_exactly(tmp_path):
    """launch/accelerate/fsdp.yaml on 2 CPU ranks (gloo): the tiny recipe's NF4 base, LoRA and S2, each
    rank accumulating 2 micro-batches (gradient sync off for the first), against one process x 4. FSDP2
    shards every layer, the uint8-packed 4-bit weights included, so the losses and the gathered adapter
    must equal the one process's to float rounding. Then the run is cut back to its checkpoint-2 and
    resumed: the resumed step 3 and adapter are the straight run's, bit for bit (measured: identical)."""
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    single = run([sys.executable], tmp_path / "single", "train.grad_accum=4", cache=cache)
    launcher = [str(VENV_BIN / "accelerate"), "launch", "--config_file", "launch/accelerate/fsdp.yaml",
                "--num_processes", "2", "--main_process_port", free_port()]
    straight = tmp_path / "fsdp"
    fsdp = run(launcher, straight, "train.grad_accum=2", "train.save_every=2", cache=cache)
    assert len(set(single)) == 3 and fsdp == pytest.approx(single, abs=1e-5)
    weights = load_file(str(straight / "final" / "adapter_model.safetensors"))
    expected = load_file(str(tmp_path / "single" / "final" / "adapter_model.safetensors"))
    assert weights.keys() == expected.keys() and len(expected) == 2 * 7 * 2  # whole A, B x 7 projections x 2 layers
    for name, tensor in expected.items():
        assert weights[name].shape == tensor.shape and (weights[name] - tensor).abs().max() <= 1e-5, name

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("final", "checkpoint-3"))
    assert {p.name for p in (resumed / "checkpoint-2").glob("optimizer-*.pt")} == {"optimizer-0.pt", "optimizer-1.pt"}
    again = run(launcher, resumed, "train.grad_accum=2", "train.save_every=2", "train.resume=\"auto\"", cache=cache)
    assert again == fsdp
    got = load_file(str(resumed / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(got[name], weights[name]) for name in weights)
