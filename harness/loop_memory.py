"""The training loop measured: what validates the planner's byte model (harness.memory) on the CPU.

    loop = training_loop(load_recipe("recipes/tiny_cpu.toml", ["train.grad_accum=1"]))
    allocator_peak(loop)            # bytes the steps add at their peak, over the built model
    eval_allocator_peak(loop)       # bytes the long-context watch's evaluation adds at its peak (at the target)
    static_bytes(loop.built.model)  # parameters + bitsandbytes quantization state (harness.memory.measure)

The steps are the training loop's own (harness.session.build_session, harness.loop.Loop.train_step) on
random tokens: the first allocates the optimizer states, the second is the steady state the planner
predicts (MemoryPlan.dynamic_bytes). The evaluation is the loop's own too (Loop.evaluator: no-grad
forwards of one held-out sample, full attention at the target; MemoryPlan.evaluation.dynamic_bytes).
The peaks are harness.memory.measure.peak_of's: torch's CPU allocator, relative to the start.
"""
from __future__ import annotations

import torch

from harness.loop import Loop
from harness.memory.measure import peak_of
from harness.recipe import Recipe
from harness.session import build_session


def training_loop(recipe: Recipe, *, schedule_steps: int = 10) -> Loop:
    """The loop of a session harness.session.build_session sets up without data (random batches come from
    train_steps); the learning-rate schedule runs over `schedule_steps`."""
    return Loop(build_session(recipe, with_data=False, steps=schedule_steps))


def random_batch(vocab: int, batch: int, length: int, generator: torch.Generator, device=None) -> dict:
    """A collated (batch, length) micro-batch of random tokens (ids >= 3: no special token), one
    unpadded document per row, as harness.data.collate would give it."""
    ids = torch.randint(3, vocab, (batch, length), generator=generator).to(device)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(length, device=ids.device).expand(batch, length)}


def train_steps(loop: Loop, steps: int = 2) -> None:
    """Optimizer steps of the training loop on random (B, L) tokens: forward, backward, clip + AdamW step."""
    recipe = loop.recipe  # resolved by the session: its sequence length is the one trained
    vocab = loop.built.model.config.vocab_size  # a PeftModel forwards .config to its base model
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loop.train_step(iter([random_batch(vocab, recipe.train.micro_batch_size, recipe.resolved.seq_len, generator)]))


def allocator_peak(loop: Loop, steps: int = 2) -> int:
    """Peak of live torch CPU-allocator bytes over `steps` training steps, relative to their start."""
    return peak_of(lambda: train_steps(loop, steps))


def eval_allocator_peak(loop: Loop) -> int:
    """Peak of live torch CPU-allocator bytes over one evaluation of the long-context watch, relative
    to its start: every reading the loop's evaluator takes of one random held-out sample of the
    length the recipe reads per sample (resolved.sample_length: the target, also under PoSE, whose
    training window is shorter; full attention at the target is the largest reading)."""
    length = loop.recipe.resolved.sample_length
    ids = random_batch(loop.built.model.config.vocab_size, 1, length, torch.Generator().manual_seed(0))["input_ids"]
    sample = {"input_ids": ids[0].tolist(), "labels": ids[0].tolist(), "position_ids": list(range(length))}
    return peak_of(lambda: loop.evaluator.run(loop.engine.module, [sample]))
