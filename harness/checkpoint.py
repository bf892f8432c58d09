"""Checkpoints: atomic save, retention, resume and the final export.

    <output_dir>/checkpoint-<step>/     adapter (PEFT format: adapter_config.json +
                                        adapter_model.safetensors, embeddings/norms included),
                                        optimizer.pt or deepspeed/, trainer_state.json (step,
                                        data position, metrics), rng-<rank>.pt, recipe.toml,
                                        rope_parameters.json
    <output_dir>/final/                 adapter + recipe.toml + rope_parameters.json

Every directory is written as `.<name>.tmp-<pid>` and renamed into place only when complete,
so a crash or a full disk never leaves a half-written checkpoint that resume would trust,
and never touches the previous one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from harness.recipe import Recipe, save_recipe

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT.match(p.name))]
    return sorted((step, path) for step, path in found if (path / STATE_FILE).is_file())


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def temporary_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp"


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished temporary directory into place (replacing an older one)."""
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_model_files(directory: Path, model, recipe: Recipe) -> None:
    """Adapter (rank 0, already gathered), resolved recipe and rope parameters."""
    model.save_pretrained(directory, safe_serialization=True)
    save_recipe(recipe, directory / "recipe.toml")
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    rope = {
        "rope_parameters": config.rope_parameters,
        "max_position_embeddings": config.max_position_embeddings,
        "original_context": recipe.resolved.original_context,
    }
    (directory / "rope_parameters.json").write_text(json.dumps(rope, indent=2), encoding="utf-8")


def write_trainer_state(directory: Path, state: dict, rank: int) -> None:
    torch.save(rng_state(), directory / f"rng-{rank}.pt")
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")


def read_trainer_state(directory: Path, rank: int) -> dict:
    state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    rng_file = directory / f"rng-{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def prune(output_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 = keep all)."""
    if keep <= 0:
        return
    for _, path in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_adapter_weights(model, directory: Path) -> None:
    """Trainable weights of a checkpoint back into a live peft model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(directory / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
