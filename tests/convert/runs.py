"""The trained runs the conversion tests convert, and where they run (tests/convert/conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness.recipe import load_recipe
from tests.conftest import ROOT, free_port, in_repo

VENV_BIN = Path(sys.executable).parent
RUN = ["train.max_steps=2", "data.max_seq_length=256", "adapter.trainable_embeddings=true",
       "adapter.trainable_norms=true"]
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def train_tiny(output_dir: Path, cache: Path) -> Path:
    """final/ of a 2-step tiny QLoRA run with trainable embeddings and norms."""
    from harness.train import train

    with in_repo(cache):
        train(load_recipe("recipes/tiny_cpu.toml", [f"train.output_dir=\"{output_dir}\"", "train.save_every=0", *RUN]))
    return output_dir / "final"


def deepspeed_run(output_dir: Path, cache: Path, config: str, *overrides: str) -> Path:
    """2-rank DeepSpeed training of the tiny recipe on the CPU; returns checkpoint-1."""
    from harness.base_model import materialize

    with in_repo(cache):  # build the base once: two ranks building it together race in the cache
        recipe = load_recipe("recipes/tiny_cpu.toml", RUN)
        materialize("random", init_config=recipe.model.init_config, init_seed=recipe.model.init_seed)
    env = {**os.environ, "HARNESS_CACHE": str(cache), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", free_port(), "launch/train.py",
               "recipes/tiny_cpu.toml", f"train.output_dir=\"{output_dir}\"", *RUN, "train.save_every=1",
               "train.grad_accum=1", "engine.name=\"deepspeed\"", f"engine.deepspeed_config=\"{config}\"", *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return output_dir / "checkpoint-1"
