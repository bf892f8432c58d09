"""Checkpoints of a training run: the collective write, retention, RNG and trainer state.

The layout and the file names are harness.rundir's. A checkpoint directory is filled by every
rank in one temporary sibling and renamed into place by rank 0 only once all ranks are done,
so a crash or a full disk never leaves a half-written checkpoint that resume would trust, and
never touches the previous one.
"""
from __future__ import annotations

import contextlib
import errno
import json
import random
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from harness import atomic, rundir
from harness.errors import first_line

COLLECTIVE_TAG = "ranks"  # one temporary name that every rank of a launch agrees on


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := rundir.CHECKPOINT_NAME.match(p.name))]
    return sorted((step, path) for step, path in found if (path / rundir.STATE_FILE).is_file())


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


@contextlib.contextmanager
def collective_dir(final: Path, engine) -> Iterator[Path]:
    """A temporary directory that every rank writes into, published as `final` by rank 0 with a
    manifest written last. A write error on any rank (OSError) is voted on, so every rank raises
    it together instead of waiting at a barrier; the temporary directory is then removed."""
    tmp = atomic.temporary_sibling(final, COLLECTIVE_TAG)
    if engine.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    failure = None
    try:
        yield tmp
    except OSError as error:
        failure = error
    except RuntimeError as error:  # torch.save reports a full disk as "PytorchStreamWriter failed writing file"
        if "writ" not in str(error):
            raise
        failure = OSError(errno.ENOSPC, f"writing failed ({first_line(error).split('] . ')[-1]})")
    if engine.all_mean(0.0 if failure else 1.0) == 1.0 and engine.rank == 0:
        failure = _publish(tmp, final)
    if engine.all_mean(0.0 if failure else 1.0) < 1.0:
        if engine.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise failure or OSError(f"another rank could not write {final}")


def _publish(tmp: Path, final: Path) -> OSError | None:
    try:
        rundir.write_manifest(tmp)
        atomic.publish(tmp, final)
    except OSError as error:
        return error
    return None


def write_trainer_state(directory: Path, state: dict, rank: int) -> None:
    torch.save(rng_state(), rundir.rng_file(directory, rank))
    if rank == 0:
        (directory / rundir.STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")


def read_trainer_state(directory: Path, rank: int) -> dict:
    state = json.loads((directory / rundir.STATE_FILE).read_text(encoding="utf-8"))
    rng_file = rundir.rng_file(directory, rank)
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def prune(output_dir: Path, keep: int, *, keep_step: int | None = None) -> None:
    """Keep the newest `keep` checkpoints (0 = keep all), and the one of step `keep_step` (the best
    held-out evaluation) besides."""
    if keep <= 0:
        return
    for step, path in checkpoints(output_dir)[:-keep]:
        if step != keep_step:
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

    weights = load_file(str(directory / rundir.ADAPTER_WEIGHTS))
    set_peft_model_state_dict(model, weights)
