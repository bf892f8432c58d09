"""The loop's held-out evaluations: how often and over how many samples, the evaluation itself, what it
prints, and the watch that warns (or stops the run) when the target's perplexity rises.

Evaluations is a part of harness.loop.Loop: its methods read the loop's state (recipe, engine, data,
evaluator, watch, step, total, train_losses, console) and the loop's checkpointing (harness.loop_saving)
to keep the best evaluation's adapter. The evaluation's arithmetic is harness.evaluation.in_training's.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from harness import policy, rundir
from harness.evaluation.in_training import LongContextEval, TransferWatch, transfer_hint, zero_weight
from harness.metrics import MetricsLog
from harness.progress import Progress
from harness.recipe import Recipe
from harness.session import TrainError

EVAL_OUT_OF_MEMORY = ("Lower train.eval_batches, turn the watch off (train.eval_holdout = 0, no data.eval_path), "
                      "or score the adapter afterwards with tools/eval_ppl.py")


class Evaluations:
    """Loop's held-out evaluation: planned at the start (_plan_evaluations), run when due (_maybe_evaluate)."""

    def _plan_evaluations(self) -> tuple[int, int]:
        """(steps between evaluations, held-out samples each scores): train.eval_every and the split (or
        train.eval_batches per replica); under train.eval_every = -1 (auto) both kept near policy.EVAL_SHARE
        of the training time, said once with what is read."""
        train, world = self.recipe.train, self.engine.data_world_size
        if self.data is None or self.data.eval is None:
            return max(train.eval_every, 0), 0
        count = min(len(self.data.eval), train.eval_batches * world) if train.eval_batches else len(self.data.eval)
        if train.eval_every >= 0:
            return train.eval_every, count
        resolved = self.recipe.resolved  # PoSE: a held-out sample is the target, a training sample the window
        longer = -(-resolved.sample_length // resolved.seq_len) if resolved.seq_len else 1
        shape = dict(readings=(1 + bool(self.evaluator.window) + bool(self.evaluator.s2)) * longer,
                     micro_batch_size=train.micro_batch_size, grad_accum=train.grad_accum,
                     checkpointing=train.gradient_checkpointing)
        per_replica = min(-(-count // world), policy.eval_samples_within(self.total, **shape))
        count = min(count, per_replica * world)
        every = policy.eval_cadence(samples=per_replica, **shape)
        readings = describe_readings(self._eval_length(count), self.evaluator)
        scored = f"{count} of the {len(self.data.eval)}" if count < len(self.data.eval) else f"{count}"
        self.console.print(f"Long-context watch: {scored} held-out samples {readings}, every {every} steps and at "
                           f"the last (train.eval_every = -1: about {policy.EVAL_SHARE:.0%} of the training time)")
        return every, count

    def _maybe_evaluate(self, metrics: MetricsLog, progress: Progress) -> None:
        """Every train.eval_every steps and at the last step: held-out perplexity (full attention) at
        the target and in windows of the original context; the watch warns (or stops the run) when
        the target's rises while the training loss falls."""
        every = self.eval_every
        if self.data.eval is None or not (self.step == self.total or (every and self.step % every == 0)):
            return
        started = time.perf_counter()
        readings = self._evaluate_within_memory()
        if readings is None:
            return
        record = {"step": self.step, **readings, "eval_length": self._eval_length(self.eval_count),
                  "eval_seconds": time.perf_counter() - started}
        metrics.write(record)
        progress.show_eval(record)
        self.console.print(describe_eval(record, self.recipe))
        warning = self.watch.add(self.step, record["eval_ppl"], sum(self.train_losses) / max(len(self.train_losses), 1))
        self.train_losses = []
        if (self.recipe.train.eval_stop and self.watch.best.step == self.step < self.total
                and not self._checkpoint_due()):
            self.save_checkpoint()  # the run may stop on a later rise: the best evaluation's adapter is kept
        if warning:
            self.console.print(f"[yellow]{warning}[/]")
            if self.recipe.train.eval_stop and self.step < self.total:
                self.stop_signal = "train.eval_stop (full-attention perplexity at the target kept rising)"

    def _evaluate_within_memory(self) -> dict[str, float] | None:
        """evaluate(); on one GPU an evaluation that runs out of memory (full attention at the target can
        need more than S2 training does: tools/plan_memory.py says so) is skipped for the rest of the run,
        with a warning, and training goes on. Across ranks the others would wait for it: the run stops."""
        try:
            return self.evaluate()
        except torch.OutOfMemoryError:
            if self.engine.world_size > 1:
                raise TrainError(f"the held-out evaluation at step {self.step} ran out of GPU memory on rank "
                                 f"{self.engine.rank}. {EVAL_OUT_OF_MEMORY}") from None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.data = dataclasses.replace(self.data, eval=None)
        self.console.print(f"[yellow]The held-out evaluation at step {self.step} ran out of GPU memory: skipped for "
                           f"the rest of the run. {EVAL_OUT_OF_MEMORY}[/]")
        return None

    def evaluate(self) -> dict[str, float]:
        """harness.evaluation.in_training over (a prefix of) this replica's share of the held-out split,
        padded with zero-weight samples to the largest share."""
        count, world = self.eval_count, self.engine.data_world_size
        samples = [self.data.eval[i] for i in range(self.engine.data_rank, count, world)]
        rounds = -(-count // world)  # every replica runs as many forwards (ZeRO-3: each is a collective)
        samples += [zero_weight(self.data.eval[0])] * (rounds - len(samples))
        return self.evaluator.run(self.engine.module, samples)

    def _eval_length(self, count: int) -> int:
        """The longest of the first `count` held-out samples: the target, unless the held-out text is shorter."""
        return max(len(self.data.eval[i]["input_ids"]) for i in range(count))

    def _report_best(self) -> None:
        best = self.watch.best
        if best is not None and len(self.watch.history) > 1:
            where = rundir.checkpoint_dir(self.output_dir, best.step)
            kept = "final/" if best.step == self.step else (where.name if where.is_dir() else "no checkpoint kept")
            self.console.print(f"Best held-out perplexity at {self.watch.target} tokens (full attention): "
                               f"{best.ppl:.2f} at step {best.step} ({kept})")


def long_context_eval(recipe: Recipe, engine, collate) -> tuple[LongContextEval, TransferWatch]:
    """The held-out evaluation and its watch for this recipe: windows of the original context where
    the target is longer (not under sequence parallelism, whose shards need whole sequences), S2
    where asked for."""
    attention, train = recipe.attention, recipe.train
    resolved = recipe.resolved
    longer = resolved.sample_length > resolved.original_context
    window = resolved.original_context if engine.sequence is None and longer else 0
    evaluator = LongContextEval(collate, engine.device, engine.autocast, engine.all_mean, window=window,
                                s2=train.eval_s2 and attention.name == "s2")
    hint = transfer_hint(recipe.position.name, attention.name, at_inference=attention.at_inference)
    return evaluator, TransferWatch(recipe.resolved.sample_length, rises=train.eval_rises, hint=hint)


def describe_readings(length: int, evaluator: LongContextEval) -> str:
    """What an evaluation reads: at 1024 tokens (full attention), in windows of 256, under S2."""
    parts = [f"at {length} tokens (full attention)"]
    if evaluator.window:
        parts.append(f"in windows of {evaluator.window}")
    if evaluator.s2:
        parts.append("under S2")
    return ", ".join(parts)


def describe_eval(record: dict, recipe: Recipe) -> str:
    """One line: step 50: held-out perplexity 6.53 at 1024 tokens, 6.41 in windows of 256, 6.40 under S2."""
    length = record.get("eval_length", recipe.resolved.sample_length)
    parts = [f"step {record['step']}: held-out perplexity {record['eval_ppl']:.2f} at {length} tokens (full attention)"]
    if "eval_ppl_window" in record:
        parts.append(f"{record['eval_ppl_window']:.2f} in windows of {recipe.resolved.original_context}")
    if "eval_ppl_s2" in record:
        parts.append(f"{record['eval_ppl_s2']:.2f} under S2")
    return ", ".join(parts)
