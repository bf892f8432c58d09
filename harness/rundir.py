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
from harness.errors import HarnessError, first_line
from harness.quiet import peft_quietly
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


def optimizer_shard_file(directory: Path, rank: int) -> Path:
    """One rank's optimizer state where it is sharded (FSDP)."""
    return directory / f"optimizer-{rank}.pt"


# --------------------------------------------------------------------------- writing

def write_model_files(directory: Path, model, recipe: Recipe, state_dict: dict | None = None) -> None:
    """Adapter (rank 0, parameters already gathered, or given whole in `state_dict`), resolved recipe
    and rope parameters."""
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
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
    """The resolved recipe saved in a checkpoint, final/ or adapter directory, after checking the
    directory against its manifest (when it has one: the harness writes one into every run dir)."""
    path = Path(directory) / RECIPE_FILE
    if not path.is_file():
        raise RunDirError(f"{directory}: no {RECIPE_FILE} in it; pass a checkpoint or final/ directory written by "
                          f"the harness")
    if (Path(directory) / MANIFEST_FILE).is_file():
        verify_manifest(Path(directory))
    return read_saved_recipe(path)


def read_rope(directory: str | Path) -> dict:
    path = Path(directory) / ROPE_FILE
    try:
        rope = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise RunDirError(f"{path}: unreadable: {first_line(error)}") from None
    if not isinstance(rope, dict) or not {"rope_parameters", "max_position_embeddings"} <= rope.keys():
        raise RunDirError(f"{path}: needs rope_parameters and max_position_embeddings")
    return rope


def attach_adapter(model, directory: str | Path):
    """peft.PeftModel over `model` with the adapter of `directory` (a base of other shapes: RunDirError)."""
    from peft import PeftModel

    try:
        with peft_quietly():
            return PeftModel.from_pretrained(model, str(directory))
    except (RuntimeError, ValueError) as error:
        if "size mismatch" in str(error):
            raise RunDirError(f"{directory}: the adapter was made for a different base model (weight shapes "
                              f"differ); pass the base model it was trained on") from None
        raise RunDirError(f"{directory}: cannot apply the adapter to this base: {first_line(error)}") from None


# --------------------------------------------------------------------------- lock and manifest

LOCK_FILE = ".lock"
MANIFEST_FILE = "manifest.json"


class RunLock:
    """An exclusive lock on a run directory, held while a run trains into it (rank 0).

    flock on <output_dir>/.lock: the kernel drops it when the process dies, so a killed run
    never leaves a stale lock. The file holds the owner's PID for the message."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / LOCK_FILE
        self.handle = None

    def __enter__(self) -> RunLock:
        import fcntl
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise RunDirError(f"train.output_dir = {str(self.path.parent)!r} is locked by PID {owner}, a run that is "
                              f"still training into it. Wait for it to finish, or choose another "
                              f"train.output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()  # releases the flock
            self.handle = None


def write_manifest(directory: Path) -> None:
    """manifest.json: every file below `directory` with its size and SHA-256. Written last, so a
    directory with a manifest that matches its files is complete."""
    files = {str(path.relative_to(directory)): _file_record(path) for path in sorted(directory.rglob("*"))
             if path.is_file() and path.name != MANIFEST_FILE}
    write_json(directory / MANIFEST_FILE, {"files": files})


def verify_manifest(directory: Path) -> None:
    """RunDirError naming the first file that is missing, of another size or another content."""
    path = directory / MANIFEST_FILE
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RunDirError(f"{directory}: its {MANIFEST_FILE} is missing or unreadable ({first_line(error)}); the "
                          f"directory was not completely written") from None
    for name, expected in files.items():
        file = directory / name
        if not file.is_file():
            raise RunDirError(f"{file}: missing (listed in {MANIFEST_FILE})")
        actual = _file_record(file, hash_it=file.stat().st_size == expected["bytes"])
        if actual["bytes"] != expected["bytes"]:
            raise RunDirError(f"{file}: {actual['bytes']:,} bytes, {MANIFEST_FILE} says {expected['bytes']:,}: the "
                              f"file is damaged")
        if actual["sha256"] != expected["sha256"]:
            raise RunDirError(f"{file}: its content differs from {MANIFEST_FILE} (SHA-256): the file is damaged")


def _file_record(path: Path, *, hash_it: bool = True) -> dict:
    import hashlib

    digest = hashlib.sha256()
    if hash_it:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest() if hash_it else ""}
