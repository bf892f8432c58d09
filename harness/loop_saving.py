"""The loop's checkpoints and export: what is written, when, and what is refused.

Saving is a part of harness.loop.Loop: its methods read the loop's state (recipe, engine, step,
total, order, watch, the evaluation plan, output_dir). The collective write, retention and trainer
state are harness.checkpoint's; where files go, harness.rundir's. Nothing with NaN/inf weights is
published, and nothing is written into a run directory that lost its lock.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from harness import checkpoint, rundir
from harness.backends.engine import local_shard
from harness.recipe import Recipe
from harness.session import TrainError


class Saving:
    """Loop's checkpoints (every train.save_every steps, at a stop signal) and the final export."""

    def _maybe_checkpoint(self) -> None:
        if self._checkpoint_due():
            self.save_checkpoint()

    def _checkpoint_due(self) -> bool:
        every = self.recipe.train.save_every
        return bool(every) and self.step % every == 0 and self.step < self.total

    def save_checkpoint(self) -> None:
        """checkpoint-<step>/, filled by every rank in a temporary directory, published when complete."""
        self._check_weights()
        self._check_run_dir()
        final = rundir.checkpoint_dir(self.output_dir, self.step)
        state = {"step": self.step, "data": self.order.state_dict(), "total_steps": self.total,
                 "watch": self.watch.state_dict(), "data_fingerprints": self.data_fingerprints,
                 "evaluations": {"every": self.eval_every, "count": self.eval_count}}
        try:
            with checkpoint.collective_dir(final, self.engine) as tmp:
                self.engine.save_state(tmp)
                checkpoint.write_trainer_state(tmp, state, self.engine.rank)
                self._write_model_files(tmp)
            if self.engine.rank == 0:
                best = self.watch.best
                checkpoint.prune(self.output_dir, self.recipe.train.keep_checkpoints, keep_step=best and best.step)
        except OSError as error:
            previous = checkpoint.latest_checkpoint(self.output_dir)
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise TrainError(f"could not write checkpoint {final}: {error.strerror or error}; {kept}. "
                             f"{_space_advice(self.output_dir, previous)} and resume with --resume") from None
        self.engine.barrier()

    def _write_model_files(self, directory: Path) -> None:
        peft_model = self.engine.unwrap().model
        with self.engine.gathered(peft_model) as whole:  # None, or the trainable weights gathered (FSDP)
            if self.engine.rank == 0:
                rundir.write_model_files(directory, peft_model, self._recipe_to_save(), state_dict=whole)

    def export(self) -> None:
        """<output_dir>/final: the adapter, loadable by peft.PeftModel.from_pretrained. Where it
        cannot be written (read-only, disk full), the adapter goes to a rescue directory instead."""
        self._check_weights()
        self._check_run_dir()
        final = self.output_dir / rundir.FINAL_DIR
        try:
            self._export_to(final)
        except OSError as error:
            rescue = rescue_dir(self.output_dir)
            self._export_to(rescue)
            raise TrainError(f"could not write {final}: {error.strerror or error}. The trained adapter was saved to "
                             f"{rescue} instead: copy it to {final}, or pass it to the tools as it is") from None
        self.console.print(f"[green]Adapter written to {final}[/]")

    def _export_to(self, directory: Path) -> None:
        with checkpoint.collective_dir(directory, self.engine) as tmp:
            self._write_model_files(tmp)
            if self.engine.rank == 0:
                rundir.write_json(tmp / rundir.STATE_FILE, {"step": self.step, "finished": True})

    def _recipe_to_save(self) -> Recipe:
        """The recipe with the best evaluation so far (resolved.best_eval_step / best_eval_ppl)."""
        best = self.watch.best
        if best is None:
            return self.recipe
        resolved = dataclasses.replace(self.recipe.resolved, best_eval_step=best.step, best_eval_ppl=best.ppl)
        return dataclasses.replace(self.recipe, resolved=resolved)

    def _last_good(self) -> str:
        latest = checkpoint.latest_checkpoint(self.output_dir)
        return f"the newest checkpoint {latest} is from before it" if latest else "no checkpoint was written yet"

    def _check_run_dir(self) -> None:
        """The run directory still holds this run's lock: one removed mid-run (rm -rf) is not filled again
        without its lock and its metrics, which another run may now own."""
        present = (self.output_dir / rundir.LOCK_FILE).is_file() if self.engine.rank == 0 else True
        if self.engine.all_mean(1.0 if present else 0.0) < 1.0:
            raise TrainError(f"{self.output_dir} was removed or emptied while this run trained into it (its lock "
                             f"file is gone) at step {self.step}: stopping without writing, since another run may "
                             f"own the folder now. Start again, into another train.output_dir if that one is in use")

    def _check_weights(self) -> None:
        """Nothing with NaN/inf weights is published: every rank checks its own trainable parameters."""
        finite = all(bool(torch.isfinite(local_shard(p)).all()) for p in self.engine.unwrap().parameters()
                     if p.requires_grad)
        if self.engine.all_mean(1.0 if finite else 0.0) < 1.0:
            raise TrainError(f"the trained weights are not finite (NaN or inf) after step {self.step}; nothing was "
                             f"written, {self._last_good()}. Lower train.lr (now {self.recipe.train.lr:g}) and "
                             f"resume with --resume")


def _space_advice(output_dir: Path, previous: Path | None) -> str:
    """How much room a checkpoint wants (the size of the last one, when there is one) and what is free."""
    import shutil

    from harness.generation import format_bytes

    free = shutil.disk_usage(output_dir).free
    needed = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()) if previous else 0
    wants = f"a checkpoint takes about {format_bytes(needed)}, " if needed else ""
    return f"Free disk space ({wants}{format_bytes(free)} free on {output_dir})"


def rescue_dir(output_dir: Path) -> Path:
    """Where an export that cannot be written goes: the harness cache, a disk of its own."""
    from harness.base_model import cache_root

    return cache_root() / "rescued" / f"{output_dir.resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"
