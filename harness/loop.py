"""The loop of one run: one optimizer step after another, as train() runs it and benchmarks time it.

    loop = Loop(build_session(recipe))   # harness.session; resuming: build_session(recipe,
                                         # resume_from=checkpoint_dir) loads the adapter weights
    loop.resume(checkpoint_dir)          # optional: optimizer, scheduler, RNG, data position
    loop.run()                           # to train.max_steps (or the epochs), a signal, or a refusal

run() reads top to bottom: each step's micro-batches (the resumable order's indices, laid out by the
layout backend, collated), train_step() (grad_accum forwards and backwards -> one optimizer step,
every target token weighted the same), the metrics line and the progress bar, then the held-out
evaluation (harness.loop_eval) and the checkpoint (harness.loop_saving) when due; at the end, the
export. SIGTERM / SIGINT (harness.signals) are read between micro-batches: the step they interrupt
is dropped, its data position and RNG rolled back, and the last whole step is checkpointed.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from harness import checkpoint, rundir
from harness.backends.layout import short_documents
from harness.fingerprint import data_fingerprint
from harness.loop_eval import Evaluations, long_context_eval
from harness.loop_saving import Saving
from harness.loss import IGNORE_INDEX
from harness.metrics import MetricsLog, drop_metrics_after
from harness.progress import Progress, peak_memory_gib
from harness.recipe import Recipe
from harness.session import Session, TrainError, make_layout, report_to
from harness.signals import StopSignals
from harness.step_time import StepTimeWatch

if TYPE_CHECKING:
    from harness.data import DataSplits


class _StepDropped(Exception):
    """A stop signal between micro-batches: the step's data position and RNG are rolled back."""


def _data_order(recipe: Recipe, data: DataSplits):
    """The resumable sample order; refused when one step takes more samples than the data holds."""
    from harness.data.order import ResumableOrder

    per_step = recipe.resolved.effective_batch_size
    if per_step > len(data.train):
        raise TrainError(f"one optimizer step takes {per_step:,} samples (train.micro_batch_size "
                         f"{recipe.train.micro_batch_size} x train.grad_accum {recipe.train.grad_accum:,} x "
                         f"{recipe.resolved.world_size} replicas) but the data holds {len(data.train):,}: lower "
                         f"train.grad_accum or add data")
    return ResumableOrder(len(data.train), seed=recipe.train.seed)


class Loop(Evaluations, Saving):
    """State of one run: step counter, data order, metrics; run() is the loop itself, train_step() one
    optimizer step (what benchmarks time). Its held-out evaluations are harness.loop_eval's, its
    checkpoints and export harness.loop_saving's."""

    def __init__(self, session: Session, *, after_step: Callable[[int], None] | None = None):
        from harness.data.collate import Collator

        recipe, engine, data = session.recipe, session.engine, session.data
        self.recipe, self.engine, self.built, self.data = recipe, engine, session.built, data
        self.console = session.console
        self.output_dir = Path(recipe.train.output_dir)
        self.collate = Collator(session.built.tokenizer.pad_token_id)
        self.order = _data_order(recipe, data) if data is not None else None
        self.layout = make_layout(recipe)
        self._describe_layout()
        self.total = session.total_steps
        self.step = 0
        self.stop_signal: str | None = None
        self.after_step = after_step or (lambda step: None)
        self.evaluator, self.watch = long_context_eval(recipe, engine, self.collate)
        self.step_time = StepTimeWatch(recipe.train.grad_accum)
        self.train_losses: list[float] = []  # since the last evaluation
        self.data_fingerprints = {key: data_fingerprint(_setting(recipe, key))
                                  for key in ("data.path", "data.eval_path")}
        if data is not None and data.held_out:
            self.data_fingerprints["train.eval_holdout"] = ",".join(map(str, data.held_out))
        self.eval_every, self.eval_count = self._plan_evaluations()
        if recipe.train.eval_every > 0 and data is not None and data.eval is None:
            self.console.print(f"[yellow]train.eval_every = {recipe.train.eval_every} but there is no held-out data: "
                               f"set data.eval_path or data.eval_fraction to see held-out perplexity during "
                               f"training[/]")

    def run(self) -> None:
        # Data-parallel replicas read different samples; the ranks of a sequence-parallel group the same ones.
        batches = self.order.batches(self.recipe.train.micro_batch_size, rank=self.engine.data_rank,
                                     world_size=self.engine.data_world_size)
        micro_batches = (self.collate(self._items(indices)) for indices in batches)
        metrics = MetricsLog(self.output_dir, report_to(self.recipe), self.recipe.to_dict(),
                             enabled=self.engine.rank == 0)
        with StopSignals(self), Progress(self.console, self.total, self.step) as progress:
            while self.step < self.total and self.stop_signal is None:
                started = time.perf_counter()
                try:
                    loss, tokens = self.train_step(micro_batches)
                except _StepDropped:
                    break
                self.step += 1
                record = self._record(loss, tokens, time.perf_counter() - started)
                self.train_losses.append(record["loss"])
                progress.update(self.step, record)
                if self.step % self.recipe.train.log_every == 0 or self.step == self.total:
                    metrics.write(record)
                self._maybe_evaluate(metrics, progress)
                self._maybe_checkpoint()
                self.after_step(self.step)
        metrics.close()
        if self.stop_signal is not None:
            self.save_checkpoint()
            self.console.print(f"[yellow]Stopped by {self.stop_signal} after step {self.step}; checkpoint saved. "
                               f"Continue with --resume.[/]")
            return
        self.export()
        self._report_best()

    def train_step(self, micro_batches: Iterator[dict]) -> tuple[float, int]:
        """One optimizer step over train.grad_accum collated micro-batches; returns (mean loss, tokens seen).
        The step's loss is the summed NLL of every target token it sees, on every rank, over their count:
        each micro-batch's loss is divided by the step's average count per micro-batch (_targets_per_micro),
        and the engines' mean over micro-batches and replicas makes it the step's. The running loss stays
        on the device; one host sync per step reads it, before the backward that ends the step.
        A stop signal between micro-batches drops the step: data position and RNG roll back (_StepDropped).
        (The step counter is `self.step`.)"""
        self.engine.module.train()
        self.lr = self.engine.lr()  # the rate this step uses, before the scheduler moves on
        order = self.order.state_dict() if self.order is not None else None  # where this step started
        rng = checkpoint.rng_state()
        accum = self.recipe.train.grad_accum
        batches = [next(micro_batches) for _ in range(accum)]  # collated on the host
        num_targets = self._targets_per_micro(batches)
        step_loss, tokens = 0.0, 0
        self.step_time.start()
        for micro, batch in enumerate(batches):
            if micro and self._stopping():  # a signal between micro-batches: the step is dropped, not half-taken
                if order is not None:
                    self.order.load_state_dict(order)
                checkpoint.set_rng_state(rng)
                raise _StepDropped
            tokens += int(batch["attention_mask"].sum())
            batch = {k: v.to(self.engine.device) for k, v in batch.items()}
            with self.engine.autocast(), _activation_offload(self.recipe.train.offload_activations):
                loss = self.engine.module(**batch, num_targets=num_targets)
            step_loss = step_loss + loss.detach()
            if micro == accum - 1:
                step_loss = float(step_loss) / accum  # the step's one host sync, before its last backward
                self._check_loss(step_loss)
            self.engine.backward(loss, sync=micro == accum - 1)
            self._warn_if_slow(micro + 1)
        self.grad_norm = self.engine.step()
        self.step_time.finish()
        self._check_gradient()
        return step_loss, tokens

    def _targets_per_micro(self, batches: list[dict]) -> float:
        """The step's target count over every replica / (replicas x grad_accum): the divisor that makes
        the engines' mean of micro-batch losses the step's token-weighted mean. (Under sequence
        parallelism the ranks of a group hold the same micro-batches, so the mean over ranks is the
        mean over replicas.)"""
        local = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in batches)
        per_micro = self.engine.all_mean(float(local)) / len(batches)
        return per_micro or 1.0  # a step without targets: its loss is 0 whatever divides it

    def _check_loss(self, loss: float) -> None:
        """A NaN/inf loss stops the run before the step reaches the weights."""
        if not math.isfinite(loss):
            raise TrainError(f"the loss became {loss} at step {self.step + 1}; lower train.lr "
                             f"or use train.precision=\"bf16\" / \"fp32\"")

    def _warn_if_slow(self, micro_batches_done: int) -> None:
        warning = self.step_time.micro_batch_done(micro_batches_done, self.step + 1)
        if warning:
            self.console.print(f"[yellow]{warning}[/]")

    def _describe_layout(self) -> None:
        """The layout's line at the start (PoSE), and a warning when training documents are too short for
        its skips to reach the target."""
        described = self.layout.describe(self.recipe.resolved.sample_length)
        if not described:
            return
        self.console.print(described)
        lengths = self.data.stats.lengths.get("train", []) if self.data is not None else []
        warning = short_documents(lengths, self.recipe.position.target_length)
        if warning:
            self.console.print(f"[yellow]{warning}[/]")

    def _check_gradient(self) -> None:
        """A NaN/inf gradient norm stops the run (fp16's loss scaler skips such steps on its own)."""
        norm, train = self.grad_norm, self.recipe.train
        if norm is None or math.isfinite(norm) or self.engine.step_config.precision == "fp16":
            return
        raise TrainError(f"the gradient norm became {norm} at step {self.step + 1}: {self._last_good()}. Lower "
                         f"train.lr (now {train.lr:g}) or check train.max_grad_norm (now {train.max_grad_norm:g}), "
                         f"then resume with --resume")

    def _stopping(self) -> bool:
        """Whether a stop signal came, agreed by every rank (one rank leaving a step would hang the others)."""
        flag = 1.0 if self.stop_signal is not None else 0.0
        return (self.engine.all_mean(flag) if self.engine.world_size > 1 else flag) > 0

    def _items(self, indices: list[int]) -> list[dict]:
        """The training samples at `indices` of this epoch, laid out as the recipe's layout computes them."""
        return [self.layout(self.data.train[i], epoch=self.order.epoch, index=i) for i in indices]

    def _record(self, loss: float, tokens: int, seconds: float) -> dict:
        world_tokens = tokens * self.engine.data_world_size
        return {
            "step": self.step, "loss": self.engine.all_mean(loss), "lr": self.lr,
            "grad_norm": self.grad_norm, "tokens": world_tokens, "tokens_per_s": world_tokens / max(seconds, 1e-9),
            "peak_memory_gib": peak_memory_gib(), "seconds": seconds,
        }

    def resume(self, directory: Path) -> None:
        """Everything of the checkpoint in `directory` but the adapter weights: the engine's state (optimizer,
        scheduler), RNG, data position, held-out watch and step. The adapter weights are loaded earlier, by
        harness.session.build_session(resume_from=directory) (checkpoint.load_adapter_weights), before the
        engine shards or wraps the model."""
        state = checkpoint.read_trainer_state(directory, self.engine.rank)
        self._check_data_unchanged(state.get("data_fingerprints", {}), directory)
        self.engine.load_state(directory)
        self.order.load_state_dict(state["data"])
        self.watch.load_state_dict(state.get("watch", {}))
        if self.recipe.train.eval_every == -1 and "evaluations" in state and self.eval_count:
            # auto: the plan of the run's start (its length decided how many samples), so the curve reads one set
            self.eval_every, self.eval_count = state["evaluations"]["every"], state["evaluations"]["count"]
        self.step = state["step"]
        if self.engine.rank == 0:
            drop_metrics_after(self.output_dir / rundir.METRICS_FILE, self.step)
        self.console.print(f"Resumed from {directory} at step {self.step}")

    def _check_data_unchanged(self, saved: dict, directory: Path) -> None:
        """Resume trains on the data the checkpoint trained on, or says so (harness.fingerprint)."""
        changed = [key for key, value in saved.items() if self.data_fingerprints.get(key) != value]
        if not changed:
            return
        where = ", ".join(f"{key} = {_setting(self.recipe, key)!r}" for key in changed)
        if self.recipe.train.allow_data_change:
            redrawn = (" The held-out samples were drawn anew from the changed data: evaluations before and after "
                       "this resume read different samples, and some held out before are trained on now."
                       if "train.eval_holdout" in changed else "")
            self.console.print(f"[yellow]{where} changed since {directory} was saved; resuming anyway "
                               f"(train.allow_data_change = true).{redrawn}[/]")
            return
        raise TrainError(f"{where} changed since {directory} was saved (file names, sizes or contents differ): "
                         f"resuming would continue on other samples. Restore the data, or resume anyway with "
                         f"train.allow_data_change=true")


def _setting(recipe: Recipe, key: str):
    """The recipe's value at "section.name"."""
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


def _activation_offload(enabled: bool):
    """On a GPU, the tensors autograd saves (the checkpointed layer inputs) wait in pinned CPU
    memory until backward: sequences longer than the card holds, at the cost of PCIe traffic."""
    import contextlib

    if enabled and torch.cuda.is_available():
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()
