"""Where a run starts: afresh, from the newest intact checkpoint, or not at all.

    start = starting_point(output_dir, recipe, engine, console)   # a checkpoint dir, or None

A fresh run refuses a directory that holds a run unless train.overwrite says so. A resumed
run (train.resume = "auto", --resume) takes the newest checkpoint whose manifest matches its
files, saying which damaged ones it passed over; refuses a finished run unless train.max_steps
extends it; and compares the recipe with the one the checkpoint saved: changes that resume
can honour (more steps, other logging or saving) are allowed and shown, the rest refused.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.console import Console

from harness import checkpoint, rundir
from harness.errors import HarnessError
from harness.recipe import Recipe

# Keys a resumed run may change: they do not touch the optimizer, the data order or the model.
SAFE_CHANGES = frozenset({
    "train.max_steps", "train.save_every", "train.keep_checkpoints", "train.log_every", "train.eval_every",
    "train.eval_batches", "train.eval_s2", "train.eval_rises", "train.eval_stop", "train.resume", "train.overwrite",
    "train.allow_data_change",
    "train.tensorboard", "train.report_to", "train.output_dir",
    "data.num_proc", "data.cache_dir", "engine.deepspeed_config",
})
# Keys that change only how much memory a step takes (and its speed), not what it computes: allowed,
# and named on one line of their own.
MEMORY_ONLY_CHANGES = frozenset({
    "train.gradient_checkpointing", "train.chunked_loss", "train.cpu_cache_mib", "attention.kernel",
    "train.offload_activations",
})
COMPARED_RESOLVED = ("resolved.seq_len", "resolved.effective_batch_size")


class ResumeError(HarnessError):
    """A run directory that this run may not start in, and what to do instead."""


def starting_point(output_dir: Path, recipe: Recipe, engine, console: Console) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; never clobbers a run silently."""
    if recipe.train.resume != "auto":
        _prepare_fresh(output_dir, recipe, engine)
        return None
    final = output_dir / rundir.FINAL_DIR
    if final.exists():
        _check_extended(final, recipe)
    latest = intact_checkpoint(output_dir, console)
    if latest is None and final.exists():
        raise ResumeError(f"{output_dir} holds a finished run but no checkpoint to continue it from (train.save_every "
                          f"was 0). Start over with train.overwrite=true, or choose another train.output_dir")
    if latest is not None:
        show_changes(rundir.read_recipe(latest), recipe, latest, console)
        _say_if_nothing_to_train(latest, recipe, console)
    else:
        console.print(f"[yellow]Nothing to resume in {output_dir}: no checkpoint there; training from step 0[/]")
    return latest


def holds_run(output_dir: Path) -> bool:
    metrics = output_dir / rundir.METRICS_FILE
    return bool(checkpoint.checkpoints(output_dir)) or (output_dir / rundir.FINAL_DIR).exists() or (
        metrics.is_file() and metrics.stat().st_size > 0)


def _prepare_fresh(output_dir: Path, recipe: Recipe, engine) -> None:
    if holds_run(output_dir) and not recipe.train.overwrite:
        raise ResumeError(
            f"train.output_dir = {str(output_dir)!r} already holds a run. Continue it with --resume "
            f"(train.resume=\"auto\"), replace it with train.overwrite=true, or choose another train.output_dir"
        )
    if engine.rank == 0:
        _clear(output_dir)
    engine.barrier()


def _clear(output_dir: Path) -> None:
    """Everything a previous run left, but the lock this run holds."""
    for path in output_dir.iterdir() if output_dir.is_dir() else ():
        if path.name != rundir.LOCK_FILE:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _check_extended(final: Path, recipe: Recipe) -> None:
    state = final / rundir.STATE_FILE
    finished = json.loads(state.read_text(encoding="utf-8"))["step"] if state.is_file() else None
    if finished is None or recipe.train.max_steps <= finished:
        steps = f"{finished} steps" if finished is not None else "all its steps"
        raise ResumeError(f"{final.parent} holds a finished run ({steps}, exported to {final}). To train further, "
                          f"resume with a larger train.max_steps; to start over, train.overwrite=true")


def _say_if_nothing_to_train(latest: Path, recipe: Recipe, console: Console) -> None:
    """A checkpoint at or past train.max_steps: the loop trains no step and exports its adapter as it is."""
    done, wanted = int(rundir.CHECKPOINT_NAME.match(latest.name).group(1)), recipe.train.max_steps
    if wanted <= 0 or done < wanted:  # max_steps 0: the epochs decide, once the data is known
        return
    what = f"train.max_steps = {wanted} is below the {done} steps {latest.name} already trained" if wanted < done \
        else f"{latest.name} already trained train.max_steps = {wanted} steps"
    undo = f". To stop at step {wanted} instead, start over with train.overwrite=true" if wanted < done else ""
    console.print(f"[yellow]{what}: no step is trained; its adapter (step {done}) is exported to "
                  f"{latest.parent / rundir.FINAL_DIR}{undo}[/]")


def intact_checkpoint(output_dir: Path, console: Console) -> Path | None:
    """The newest checkpoint whose manifest matches its files; damaged ones are named and passed over."""
    found = checkpoint.checkpoints(output_dir)
    problems = []
    for _, directory in reversed(found):
        try:
            rundir.verify_manifest(directory)
        except rundir.RunDirError as error:
            problems.append(str(error))
            continue
        for problem in problems:
            console.print(f"[yellow]Skipping a damaged checkpoint: {problem}; resuming from {directory}[/]")
        return directory
    if problems:
        raise ResumeError(f"no intact checkpoint in {output_dir}: {'; '.join(problems)}. Start over with "
                          f"train.overwrite=true")
    return None


def show_changes(saved: Recipe, recipe: Recipe, directory: Path, console: Console) -> None:
    """Print the changes resume honours; ResumeError listing the ones it cannot."""
    before, after = _flat(saved), _flat(recipe)
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key)
                     and (not key.startswith("resolved.") or key in COMPARED_RESOLVED))
    lines = {key: f"{key} {before.get(key)!r} -> {after.get(key)!r}" for key in changed}
    refused = [lines[key] for key in changed if key not in SAFE_CHANGES | MEMORY_ONLY_CHANGES]
    if refused:
        raise ResumeError(f"resume cannot honour these changes to the recipe saved in {directory}: "
                          f"{'; '.join(refused)}. Undo them, or start a new run (another train.output_dir, or "
                          f"train.overwrite=true)")
    for key in changed:
        if key in SAFE_CHANGES and key != "train.resume":  # --resume itself
            console.print(f"Resuming with a changed setting: {lines[key]}")
    memory = [lines[key] for key in changed if key in MEMORY_ONLY_CHANGES]
    if memory:
        console.print(f"Resuming with changed memory settings: {'; '.join(memory)}: they change only the memory "
                      f"(and speed) of a step, not what it computes")


def _flat(recipe: Recipe) -> dict:
    return {f"{table}.{key}": value for table, values in recipe.to_dict().items() for key, value in values.items()}
