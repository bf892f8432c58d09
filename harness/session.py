"""A run set up: engine, base, data, model, optimizer and scheduler, as train() and the benchmarks use them.

    session = build_session(recipe)     # the engine started when none is given
    Loop(session).run()                 # harness.loop: train() does this
    Loop(session).train_step(batches)   # what benchmarks time, with their own batches (with_data=False)

build_session reads top to bottom: config and tokenizer first (rank 0 first), the recipe with every fact
of the launch (recipe.with_launch_facts), the data backend and its held-out split before any weights
load, the model (harness.model), the engine's prepare. Below it, the factories a run makes its parts with: the
engine, the layout, the optimizer (as harness.policy names it), the scheduler, the step count.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from rich.console import Console

from harness import checkpoint, policy, registry
from harness.backends.engine import Engine, StepConfig
from harness.cpu_memory import apply_recipe_policy
from harness.errors import HarnessError
from harness.fingerprint import weights_fingerprint
from harness.loss import CausalLMLoss
from harness.model import BuiltModel, build_model, load_base, weights_dtype_of
from harness.recipe import Recipe, find_relative, with_launch_facts

if TYPE_CHECKING:
    from harness.data import DataSplits


class TrainError(HarnessError, RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


@dataclasses.dataclass
class Session:
    """A run set up as train() sets it up, ready to step. Benchmarks build one too (with_data=False
    and their own batches), so that they time what training runs."""
    recipe: Recipe  # with every fact of this launch (with_launch_facts): replicas, original context, weights dtype
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
    recipe = with_launch_facts(recipe, world_size=engine.data_world_size, original_context=base.original_context,
                               weights_dtype=weights_dtype_of(recipe), base_fingerprint=weights_fingerprint(base.path))
    data = _rank_zero_first(engine, lambda: _build_data(recipe, base.tokenizer)) if with_data else None
    if data is not None and engine.rank == 0:
        from harness.data.report import print_length_stats

        print_length_stats(data.stats, console=console)
        _report_held_out(recipe, data, console)
    built = build_model(recipe, training=True, base=base, console=console)
    if resume_from is not None:  # before the engine shards or wraps the parameters (FSDP: DTensors)
        checkpoint.load_adapter_weights(built.model, resume_from)
    total = total_steps(recipe, len(data.train)) if data is not None else steps or recipe.train.max_steps
    step_config = step_config_of(recipe, engine)
    engine.prepare(CausalLMLoss(built.model, chunked=recipe.train.chunked_loss, sequence=engine.sequence),
                   lambda params: make_optimizer(recipe, engine, step_config, params),
                   lambda optimizer: make_scheduler(recipe, optimizer, total), step_config)
    return Session(recipe, engine, built, data, total, console)


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
        capped = (f" (train.eval_holdout = {asked}: at most 1 sample in 10 is held out)"
                  if asked > len(data.held_out) else "")
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


# --------------------------------------------------------------------------- optimizer

def step_config_of(recipe: Recipe, engine: Engine) -> StepConfig:
    """What the engine needs of a step: batch shape, clipping and the precision harness.policy picks for its device."""
    train = recipe.train
    precision = policy.precision(train.precision, recipe.quantization.compute_dtype, policy.Device.of(engine.device))
    return StepConfig(train.micro_batch_size, train.grad_accum, train.max_grad_norm, precision)


def make_optimizer(recipe: Recipe, engine: Engine, step_config: StepConfig, params):
    """train.optimizer, as harness.policy.optimizer chooses it for this device and engine."""
    name = optimizer_name(recipe, engine, step_config)
    kwargs = dict(lr=recipe.train.lr, weight_decay=recipe.train.weight_decay, betas=(0.9, 0.999))
    if name == "deepspeed_cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    if name == "paged_adamw_32bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def optimizer_name(recipe: Recipe, engine: Engine, step_config: StepConfig) -> str:
    """The optimizer a run makes on the engine's device: "adamw", "paged_adamw_32bit" or "deepspeed_cpu_adam"."""
    return policy.optimizer(recipe.train.optimizer, policy.Device.of(engine.device),
                            offloaded=engine.offloads_optimizer(step_config))


def make_scheduler(recipe: Recipe, optimizer, steps: int):
    from transformers import get_scheduler

    return get_scheduler(recipe.train.scheduler, optimizer, num_warmup_steps=recipe.train.warmup_steps,
                         num_training_steps=steps)


def total_steps(recipe: Recipe, num_samples: int) -> int:
    """train.max_steps, else the epochs' full steps of resolved.effective_batch_size samples."""
    if recipe.train.max_steps > 0:
        return recipe.train.max_steps
    per_step = recipe.resolved.effective_batch_size
    steps = recipe.train.epochs * (num_samples // per_step)
    if steps == 0:
        raise TrainError(f"{num_samples} samples make no full step of {per_step} sequences; "
                         f"lower train.grad_accum / micro_batch_size or add data")
    return steps
