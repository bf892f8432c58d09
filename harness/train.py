"""The training entry point: a recipe in, a trained adapter out, under any launcher.

Reads top to bottom:

    engine  = the recipe's engine; process group formed and checked
    run dir = locked; refused if it holds a run, unless train.resume / train.overwrite say so
              (harness.resume: the newest intact checkpoint, recipe changes checked)
    session = harness.session.build_session: data = the recipe's data backend on the base's
              tokenizer, before any weights load; model = base -> PI -> 4-bit -> attention -> LoRA
              (harness.model); the engine prepares it, the optimizer and scheduler made
    loop    = harness.loop.Loop: micro-batches x grad_accum -> one optimizer step; log, eval, checkpoint
              (eval: held-out perplexity with full attention at the target length and in windows
              of the original context, harness.evaluation.in_training, watched for S2 that does
              not transfer: harness.loop_eval)
    export  = <output_dir>/final: PEFT adapter + resolved recipe + rope parameters (harness.loop_saving)
    teardown = the engine's state, sequence-parallel groups and process group, on every rank

SIGTERM / SIGINT are read between micro-batches (harness.signals): a step they interrupt is dropped
(its data position and RNG rolled back), a checkpoint of the last whole step is saved and the run
returns; the next run with train.resume = "auto" (or --resume) continues exactly there: adapter,
optimizer, scheduler, RNG and data position are all restored. Nothing with NaN/inf weights is
ever saved, and a non-finite gradient stops the run before it reaches the weights.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

from rich.console import Console

from harness import checkpoint, rundir
from harness.backends.engine import Engine, torn_down
from harness.cpu_memory import apply_recipe_policy
from harness.errors import HarnessError, first_line
from harness.loop import Loop
from harness.metrics import check_trackers
from harness.recipe import Recipe, with_launch_facts
from harness.resume import starting_point
from harness.session import TrainError, build_session, report_to, start_engine


# --------------------------------------------------------------------------- entry point

def train(recipe: Recipe, *, after_step: Callable[[int], None] | None = None) -> Path:
    """Run a recipe to the end (or to a signal); returns the output directory.

    `after_step(step)` is called after every optimizer step (tests use it to send signals)."""
    cpu_policy = apply_recipe_policy(recipe.train)  # before anything is allocated
    engine = start_engine(recipe)
    with torn_down(engine):  # engine, sub-groups, process group: every rank, once the run finished
        console = Console(stderr=True, quiet=engine.rank != 0)
        if cpu_policy:
            console.print(f"CPU memory: {cpu_policy}")
        output_dir = Path(recipe.train.output_dir)
        check_trackers(report_to(recipe))
        with _locked(output_dir, engine):
            # the engine's data-parallel replicas: the effective batch a checkpoint's recipe is compared with
            launched = with_launch_facts(recipe, world_size=engine.data_world_size)
            resume_from = starting_point(output_dir, launched, engine, console)
            session = build_session(recipe, engine=engine, console=console, resume_from=resume_from)
            loop = Loop(session, after_step=after_step)
            if resume_from is not None:
                loop.resume(resume_from)
            with _peer_loss_reported(engine, output_dir):
                loop.run()
        del session, loop  # the model and its hooks go before the groups they hold
    return output_dir


@contextlib.contextmanager
def _peer_loss_reported(engine: Engine, output_dir: Path):
    """A rank that died takes the others' collectives down with gloo/NCCL errors: turn them into one
    line that says what happened and how to go on (the dead rank printed its own reason)."""
    try:
        yield
    except RuntimeError as error:  # torch.distributed.DistBackendError is a RuntimeError
        if engine.world_size == 1 or isinstance(error, HarnessError):
            raise
        latest = checkpoint.latest_checkpoint(output_dir)
        resume = f"Continue from {latest} with --resume" if latest else "No checkpoint was written yet: start again"
        raise TrainError(f"rank {engine.rank} lost contact with another rank of this launch, which stopped (see its "
                         f"own message above): {first_line(error).split(' This is typically')[0]} {resume}") from None


# --------------------------------------------------------------------------- run directory

@contextlib.contextmanager
def _locked(output_dir: Path, engine):
    """Rank 0 holds the run directory's lock for the whole run; every rank learns whether it got it."""
    lock, refused = rundir.RunLock(output_dir), None
    if engine.rank == 0:
        try:
            _check_writable(output_dir)
            lock.__enter__()
        except HarnessError as error:
            refused = error
    if engine.all_mean(0.0 if refused else 1.0) < 1.0:
        raise refused or TrainError(f"rank 0 could not lock train.output_dir = {str(output_dir)!r}")
    try:
        yield
    finally:
        lock.__exit__()


def _check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise TrainError(f"train.output_dir = {str(output_dir)!r} is not writable: {error.strerror}. "
                         f"Choose a writable directory with train.output_dir=...") from None
