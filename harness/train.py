"""The training loop: a recipe in, a trained adapter out, under any launcher.

Reads top to bottom:

    engine  = the recipe's engine; process group formed and checked
    run dir = locked; refused if it holds a run, unless train.resume / train.overwrite say so
              (harness.resume: the newest intact checkpoint, recipe changes checked)
    data    = the recipe's data backend on the base's tokenizer, before any weights load;
              a resumable, rank-sliced order
    model   = base -> PI -> 4-bit -> attention -> LoRA (harness.model)
    loop    = micro-batches x grad_accum -> one optimizer step; log, eval, checkpoint
              (eval: held-out perplexity with full attention at the target length and in windows
              of the original context, harness.evaluation.in_training, watched for S2 that does
              not transfer)
    export  = <output_dir>/final: PEFT adapter + resolved recipe + rope parameters

SIGTERM / SIGINT are read between micro-batches: a step they interrupt is dropped (its data
position and RNG rolled back), a checkpoint of the last whole step is saved and the run returns;
the next run with train.resume = "auto" (or --resume) continues exactly there: adapter,
optimizer, scheduler, RNG and data position are all restored. Nothing with NaN/inf weights is
ever saved, and a non-finite gradient stops the run before it reaches the weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import resource
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
from rich.console import Console

from harness import checkpoint, policy, registry, rundir
from harness.backends.engine import Engine, Hyper, local_shard, torn_down
from harness.cpu_memory import apply_recipe_policy
from harness.errors import HarnessError, first_line
from harness.evaluation.in_training import LongContextEval, TransferWatch, transfer_hint, zero_weight
from harness.fingerprint import data_fingerprint, weights_fingerprint
from harness.loss import IGNORE_INDEX, CausalLMLoss
from harness.metrics import MetricsLog, check_trackers, drop_metrics_after
from harness.model import BuiltModel, build_model, load_base, weights_dtype_of
from harness.recipe import Recipe, find_relative, resolve
from harness.resume import starting_point
from harness.step_time import StepTimeWatch

if TYPE_CHECKING:
    from harness.data import DataSplits


EVAL_OUT_OF_MEMORY = ("Lower train.eval_batches, turn the watch off (train.eval_holdout = 0, no data.eval_path), "
                      "or score the adapter afterwards with tools/eval_ppl.py")


class TrainError(HarnessError, RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class _StepDropped(Exception):
    """A stop signal between micro-batches: the step's data position and RNG are rolled back."""


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
            resume_from = starting_point(output_dir, resolve(recipe, world_size=engine.data_world_size), engine,
                                         console)
            session = build_session(recipe, engine=engine, console=console, resume_from=resume_from)
            loop = Loop(session, after_step=after_step)
            if resume_from is not None:
                loop.resume(resume_from)
            with _peer_loss_reported(engine, output_dir):
                loop.run()
        del session, loop  # the model and its hooks go before the groups they hold
    return output_dir


# --------------------------------------------------------------------------- set-up

@dataclasses.dataclass
class Session:
    """A run set up as train() sets it up, ready to step. Benchmarks build one too (with_data=False
    and their own batches), so that they time what training runs."""
    recipe: Recipe  # resolved with every fact of this launch: world size, original context, weights dtype
    engine: Engine  # set up; the model prepared (wrapped or sharded), optimizer and scheduler made
    built: BuiltModel
    data: DataSplits | None  # None: the caller brings its own batches
    total_steps: int
    console: Console


def build_session(recipe: Recipe, *, engine: Engine | None = None, console: Console | None = None,
                  resume_from: Path | None = None, with_data: bool = True, steps: int = 0) -> Session:
    """Engine, base, data and model of `recipe`, as a run uses them. Without data, the schedule
    runs over `steps` (or train.max_steps) steps."""
    if engine is None:
        apply_recipe_policy(recipe.train)
        engine = start_engine(recipe)
    console = console or Console(stderr=True, quiet=engine.rank != 0)
    seed_everything(recipe.train.seed + engine.rank)
    # Config and tokenizer first: the data is checked before any weights load. Rank 0 builds a cached
    # base (random, GGUF) alone: under torch.distributed transformers writes config.json on rank 0 only.
    base = _rank_zero_first(engine, lambda: load_base(recipe))
    recipe = resolve(recipe, world_size=engine.data_world_size, original_context=base.original_context,
                     weights_dtype=weights_dtype_of(recipe), base_fingerprint=weights_fingerprint(base.path))
    data = _rank_zero_first(engine, lambda: _build_data(recipe, base.tokenizer)) if with_data else None
    if data is not None and engine.rank == 0:
        from harness.data.report import print_length_stats

        print_length_stats(data.stats, console=console)
        _report_held_out(recipe, data, console)
    built = build_model(recipe, training=True, base=base, console=console)
    if resume_from is not None:  # before the engine shards or wraps the parameters (FSDP: DTensors)
        checkpoint.load_adapter_weights(built.model, resume_from)
    total = total_steps(recipe, len(data.train), engine) if data is not None else steps or recipe.train.max_steps
    hyper = hyper_of(recipe, engine)
    engine.prepare(CausalLMLoss(built.model, chunked=recipe.train.chunked_loss, sequence=engine.sequence),
                   lambda params: make_optimizer(recipe, engine, hyper, params),
                   lambda optimizer: make_scheduler(recipe, optimizer, total), hyper)
    return Session(recipe, engine, built, data, total, console)


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


def report_to(recipe: Recipe) -> list[str]:
    """train.report_to, with the older train.tensorboard = true read as "tensorboard"."""
    names = list(recipe.train.report_to)
    return names + ["tensorboard"] if recipe.train.tensorboard and "tensorboard" not in names else names


def start_engine(recipe: Recipe) -> Engine:
    """The recipe's engine, its process group formed and checked."""
    engine = make_engine(recipe)
    engine.setup()
    return engine


def make_engine(recipe: Recipe) -> Engine:
    """The recipe's engine, not yet set up (no process group)."""
    backend = registry.get("engine", recipe.engine.name, key="engine.name")
    kwargs = registry.table_kwargs(backend, recipe.engine)
    if kwargs.get("deepspeed_config"):
        kwargs["deepspeed_config"] = str(find_relative(kwargs["deepspeed_config"], recipe.source,
                                                       key="engine.deepspeed_config"))
    return backend.fn(**kwargs)


def make_layout(recipe: Recipe):
    """The recipe's layout backend: which tokens of a training sample are computed, at which positions."""
    backend = registry.get("layout", recipe.layout.name, key="layout.name")
    return backend.fn(window=recipe.resolved.seq_len, seed=recipe.train.seed,
                      **registry.table_kwargs(backend, recipe.layout))


def _build_data(recipe: Recipe, tokenizer):
    backend = registry.get("data", recipe.data.name, key="data.name")
    kwargs = registry.table_kwargs(backend, recipe.data)
    if "max_seq_length" in kwargs:
        kwargs["max_seq_length"] = recipe.resolved.sample_length  # the window, or the target under PoSE
    return _with_held_out(recipe, backend.fn(tokenizer, seed=recipe.train.seed, **kwargs))


def _with_held_out(recipe: Recipe, data: DataSplits) -> DataSplits:
    """The held-out split the recipe names, else train.eval_holdout training samples (harness.data.held_out)."""
    from harness.data import held_out

    if data.eval is not None or not recipe.train.eval_holdout:
        return data
    indices = held_out.choose(data.train, recipe.train.eval_holdout, recipe.resolved.sample_length,
                             recipe.train.seed)
    return held_out.hold_out(data, indices) if indices else data


def _report_held_out(recipe: Recipe, data: DataSplits, console: Console) -> None:
    """Which training samples the watch holds out, or why it has nothing to read."""
    if data.held_out:
        asked = recipe.train.eval_holdout
        capped = f" (train.eval_holdout = {asked}: at most 1 sample in 10 is held out)" if asked > len(data.held_out) else ""
        console.print(f"Held out {len(data.held_out)} training samples{capped} of data.path (indices "
                      f"{', '.join(map(str, data.held_out))}) for the long-context watch: never trained on. "
                      f"data.eval_path names other text instead; train.eval_holdout = 0 turns this off")
    elif data.eval is None and recipe.train.eval_holdout:
        console.print(f"[yellow]No long-context watch: {len(data.train)} training samples are too few to hold out "
                      f"train.eval_holdout = {recipe.train.eval_holdout} of them (at most 1 in 10). Set "
                      f"data.eval_path to held-out text[/]")


def _rank_zero_first(engine, build):
    if engine.rank != 0:
        engine.barrier()
    result = build()
    if engine.rank == 0:
        engine.barrier()
    return result


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


# --------------------------------------------------------------------------- optimizer

def hyper_of(recipe: Recipe, engine: Engine) -> Hyper:
    """The engine's settings: batch shape, clipping and the precision harness.policy picks for its device."""
    train = recipe.train
    precision = policy.precision(train.precision, recipe.quantization.compute_dtype, policy.Device.of(engine.device))
    return Hyper(train.micro_batch_size, train.grad_accum, train.max_grad_norm, precision)


def make_optimizer(recipe: Recipe, engine: Engine, hyper: Hyper, params):
    """train.optimizer, as harness.policy.optimizer chooses it for this device and engine."""
    name = optimizer_name(recipe, engine, hyper)
    kwargs = dict(lr=recipe.train.lr, weight_decay=recipe.train.weight_decay, betas=(0.9, 0.999))
    if name == "deepspeed_cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    if name == "paged_adamw_32bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def optimizer_name(recipe: Recipe, engine: Engine, hyper: Hyper) -> str:
    """The optimizer a run makes on the engine's device: "adamw", "paged_adamw_32bit" or "deepspeed_cpu_adam"."""
    return policy.optimizer(recipe.train.optimizer, policy.Device.of(engine.device),
                            offloaded=engine.offloads_optimizer(hyper))


def make_scheduler(recipe: Recipe, optimizer, steps: int):
    from transformers import get_scheduler

    return get_scheduler(recipe.train.scheduler, optimizer, num_warmup_steps=recipe.train.warmup_steps,
                         num_training_steps=steps)


def total_steps(recipe: Recipe, num_samples: int, engine) -> int:
    if recipe.train.max_steps > 0:
        return recipe.train.max_steps
    per_step = recipe.train.micro_batch_size * recipe.train.grad_accum * engine.data_world_size
    steps = recipe.train.epochs * (num_samples // per_step)
    if steps == 0:
        raise TrainError(f"{num_samples} samples make no full step of {per_step} sequences; "
                         f"lower train.grad_accum / micro_batch_size or add data")
    return steps


# --------------------------------------------------------------------------- the loop

def _data_order(recipe: Recipe, engine: Engine, data: DataSplits):
    """The resumable sample order; refused when one step takes more samples than the data holds."""
    from harness.data.order import ResumableOrder

    per_step = recipe.train.micro_batch_size * recipe.train.grad_accum * engine.data_world_size
    if per_step > len(data.train):
        raise TrainError(f"one optimizer step takes {per_step:,} samples (train.micro_batch_size "
                         f"{recipe.train.micro_batch_size} x train.grad_accum {recipe.train.grad_accum:,} x "
                         f"{engine.data_world_size} replicas) but the data holds {len(data.train):,}: lower "
                         f"train.grad_accum or add data")
    return ResumableOrder(len(data.train), seed=recipe.train.seed)


class Loop:
    """State of one run: step counter, data order, metrics; run() is the loop itself, train_step() one
    optimizer step (what benchmarks time)."""

    def __init__(self, session: Session, *, after_step: Callable[[int], None] | None = None):
        from harness.data.collate import Collator

        recipe, engine, data = session.recipe, session.engine, session.data
        self.recipe, self.engine, self.built, self.data = recipe, engine, session.built, data
        self.console = session.console
        self.output_dir = Path(recipe.train.output_dir)
        self.collate = Collator(session.built.tokenizer.pad_token_id)
        self.order = _data_order(recipe, engine, data) if data is not None else None
        self.layout = make_layout(recipe)
        described = self.layout.describe(recipe.resolved.sample_length)
        if described:
            self.console.print(described)
        self.total = session.total_steps
        self.step = 0
        self.stop_signal: str | None = None
        self.after_step = after_step or (lambda step: None)
        self.evaluator, self.watch = _long_context_eval(recipe, engine, self.collate)
        self.step_time = StepTimeWatch(recipe.train.grad_accum)
        self.train_losses: list[float] = []  # since the last evaluation
        self.data_fingerprints = {key: data_fingerprint(_setting(recipe, key)) for key in ("data.path", "data.eval_path")}
        if data is not None and data.held_out:
            self.data_fingerprints["train.eval_holdout"] = ",".join(map(str, data.held_out))
        self.eval_every, self.eval_count = self._plan_evaluations()
        if recipe.train.eval_every > 0 and data is not None and data.eval is None:
            self.console.print(f"[yellow]train.eval_every = {recipe.train.eval_every} but there is no held-out data: set "
                               f"data.eval_path or data.eval_fraction to see held-out perplexity during training[/]")

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
        shape = dict(readings=1 + bool(self.evaluator.window) + bool(self.evaluator.s2),
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

    def resume(self, directory: Path) -> None:
        """Everything but the adapter weights, which train() loads before the engine prepares the model."""
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

    def run(self) -> None:
        # Data-parallel replicas read different samples; the ranks of a sequence-parallel group the same ones.
        batches = self.order.batches(self.recipe.train.micro_batch_size, rank=self.engine.data_rank,
                                     world_size=self.engine.data_world_size)
        micro_batches = (self.collate(self._items(indices)) for indices in batches)
        metrics = MetricsLog(self.output_dir, report_to(self.recipe), self.recipe.to_dict(),
                             enabled=self.engine.rank == 0)
        with _signals(self), Progress(self.console, self.total, self.step) as progress:
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

    def _check_gradient(self) -> None:
        """A NaN/inf gradient norm stops the run (fp16's loss scaler skips such steps on its own)."""
        norm, train = self.grad_norm, self.recipe.train
        if norm is None or math.isfinite(norm) or self.engine.hyper.precision == "fp16":
            return
        raise TrainError(f"the gradient norm became {norm} at step {self.step + 1}: {self._last_good()}. Lower "
                         f"train.lr (now {train.lr:g}) or check train.max_grad_norm (now {train.max_grad_norm:g}), "
                         f"then resume with --resume")

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

    # ----------------------------------------------------------------------- eval

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
        if self.recipe.train.eval_stop and self.watch.best.step == self.step < self.total and not self._checkpoint_due():
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

    def _recipe_to_save(self) -> Recipe:
        """The recipe with the best evaluation so far (resolved.best_eval_step / best_eval_ppl)."""
        best = self.watch.best
        if best is None:
            return self.recipe
        resolved = dataclasses.replace(self.recipe.resolved, best_eval_step=best.step, best_eval_ppl=best.ppl)
        return dataclasses.replace(self.recipe, resolved=resolved)

    # ----------------------------------------------------------------------- saving

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


def _long_context_eval(recipe: Recipe, engine, collate) -> tuple[LongContextEval, TransferWatch]:
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


def _setting(recipe: Recipe, key: str):
    """The recipe's value at "section.name"."""
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


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


def _activation_offload(enabled: bool):
    """On a GPU, the tensors autograd saves (the checkpointed layer inputs) wait in pinned CPU
    memory until backward: sequences longer than the card holds, at the cost of PCIe traffic."""
    import contextlib

    if enabled and torch.cuda.is_available():
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- signals

class _signals:
    """SIGTERM / SIGINT set loop.stop_signal; the loop finishes its step and checkpoints."""

    def __init__(self, loop: Loop):
        self.loop = loop

    def __enter__(self):
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.loop.stop_signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- reporting

def peak_memory_gib() -> float:
    """Peak GPU memory allocated, or the process's peak RSS on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class Progress:
    """A rich progress bar: step, loss, lr, tokens/s, peak memory, the last evaluation and ETA. Where the
    output is no terminal (CI logs, nohup, | tee) the bar would show nothing until the end: a plain
    line every `plain_every_s` seconds instead, and at the last step."""

    def __init__(self, console: Console, total: int, start: int, plain_every_s: float = 30.0):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.console, self.total, self.plain_every_s = console, total, plain_every_s
        self.plain = not console.is_terminal
        self.last_plain = time.monotonic()
        self.bar = RichProgress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(), console=console, disable=console.quiet or self.plain,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, stats="")
        self.eval = ""  # the last evaluation, shown after the step's figures

    def __enter__(self):
        self.bar.__enter__()
        return self

    def update(self, step: int, record: dict) -> None:
        stats = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s  "
                 f"mem {record['peak_memory_gib']:.2f} GiB{self.eval}")
        self.bar.update(self.task, completed=step, stats=stats)
        if self.plain and (step == self.total or time.monotonic() - self.last_plain >= self.plain_every_s):
            self.last_plain = time.monotonic()
            self.console.print(f"train {step}/{self.total}  {stats}", soft_wrap=True)

    def show_eval(self, record: dict) -> None:
        window = f" / {record['eval_ppl_window']:.2f}" if "eval_ppl_window" in record else ""
        self.eval = f"  eval ppl {record['eval_ppl']:.2f}{window}"

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)
