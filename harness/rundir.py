"""The run directory: its layout, and reading and writing what a trained model needs.

    <train.output_dir>/
        metrics.jsonl                 one JSON object per logged step (rank 0)
        checkpoint-<step>/            adapter files + recipe + rope, trainer_state.json,
                                      rng-<rank>.pt, optimizer.pt or deepspeed/
        final/                        adapter files + recipe.toml + rope_parameters.json

Adapter files are PEFT's (adapter_config.json, adapter_model.safetensors: LoRA plus the
trainable embeddings and norms). recipe.toml is the resolved recipe and rope_parameters.json
the extended rope, so every tool rebuilds the trained model from the directory alone. Every
file and directory here is written atomically (harness.atomic).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from harness import atomic
from harness.errors import HarnessError
from harness.recipe import Recipe, read_saved_recipe, save_recipe

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RECIPE_FILE = "recipe.toml"
ROPE_FILE = "rope_parameters.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_DIR = "deepspeed"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
MODEL_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, RECIPE_FILE, ROPE_FILE)


class RunDirError(HarnessError):
    """A run, checkpoint or adapter directory that cannot be used as it is."""


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step}"


def rng_file(directory: Path, rank: int) -> Path:
    return directory / f"rng-{rank}.pt"


# --------------------------------------------------------------------------- writing

def write_model_files(directory: Path, model, recipe: Recipe) -> None:
    """Adapter (rank 0, parameters already gathered), resolved recipe and rope parameters."""
    model.save_pretrained(directory, safe_serialization=True)
    save_recipe(recipe, directory / RECIPE_FILE)
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    write_rope(directory, rope_record(config, recipe.resolved.original_context))


def rope_record(config, original_context: int) -> dict:
    """What rope_parameters.json holds: the extended rope of a (position-edited) model config."""
    return {"rope_parameters": config.rope_parameters, "max_position_embeddings": config.max_position_embeddings,
            "original_context": original_context}


def write_rope(directory: Path, rope: dict) -> None:
    atomic.write_text(directory / ROPE_FILE, json.dumps(rope, indent=2))


def write_json(path: Path, value) -> None:
    atomic.write_text(path, json.dumps(value, indent=2))


# --------------------------------------------------------------------------- reading

def read_recipe(directory: str | Path) -> Recipe:
    """The resolved recipe saved in a checkpoint, final/ or adapter directory."""
    path = Path(directory) / RECIPE_FILE
    if not path.is_file():
        raise RunDirError(f"{directory}: no {RECIPE_FILE} in it; pass a checkpoint or final/ directory written by "
                          f"the harness")
    return read_saved_recipe(path)


def read_rope(directory: str | Path) -> dict:
    path = Path(directory) / ROPE_FILE
    try:
        rope = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise RunDirError(f"{path}: unreadable: {_first_line(error)}") from None
    if not isinstance(rope, dict) or not {"rope_parameters", "max_position_embeddings"} <= rope.keys():
        raise RunDirError(f"{path}: needs rope_parameters and max_position_embeddings")
    return rope


def attach_adapter(model, directory: str | Path):
    """peft.PeftModel over `model` with the adapter of `directory` (a base of other shapes: RunDirError)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(directory))
    except (RuntimeError, ValueError) as error:
        if "size mismatch" in str(error):
            raise RunDirError(f"{directory}: the adapter was made for a different base model (weight shapes "
                              f"differ); pass the base model it was trained on") from None
        raise RunDirError(f"{directory}: cannot apply the adapter to this base: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
