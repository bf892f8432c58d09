"""What the byte model is validated against: torch's CPU allocator over real training steps.

    loop = training_loop(load_recipe("recipes/tiny_cpu.toml", ["train.grad_accum=1"]))
    allocator_peak(loop)            # bytes the steps add at their peak, over the built model
    eval_allocator_peak(loop)       # bytes the long-context watch's evaluation adds at its peak (at the target)
    static_bytes(loop.built.model)  # parameters + bitsandbytes quantization state

The steps are the training loop's own (harness.train.build_session, Loop.train_step) on random
tokens: the first allocates the optimizer states, the second is the steady state the planner
predicts (MemoryPlan.dynamic_bytes). The evaluation is the loop's own too (Loop.evaluator: no-grad
forwards of one held-out sample, full attention at the target; MemoryPlan.evaluation.dynamic_bytes).
Not counted: memory outside torch's allocator (oneDNN scratch, Python objects), which the planner
does not model either.
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from harness.recipe import Recipe
from harness.train import Loop, build_session


def static_bytes(model) -> int:
    """Parameters and bitsandbytes quantization state of a built model, each storage once."""
    seen, total = set(), 0
    for parameter in model.parameters():
        tensors = [parameter]
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code] + ([state.state2.absmax, state.state2.code, state.offset]
                                                     if state.nested else [])
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def training_loop(recipe: Recipe, *, schedule_steps: int = 10) -> Loop:
    """The loop of a session set up as harness.train.train sets it up, without data (random batches
    come from train_steps); the learning-rate schedule runs over `schedule_steps`."""
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
    return _peak_of(lambda: train_steps(loop, steps))


def eval_allocator_peak(loop: Loop) -> int:
    """Peak of live torch CPU-allocator bytes over one evaluation of the long-context watch, relative
    to its start: every reading the loop's evaluator takes of one random held-out sample of the
    length the recipe reads per sample (resolved.sample_length: the target, also under PoSE, whose
    training window is shorter; full attention at the target is the largest reading)."""
    length = loop.recipe.resolved.sample_length
    ids = random_batch(loop.built.model.config.vocab_size, 1, length, torch.Generator().manual_seed(0))["input_ids"]
    sample = {"input_ids": ids[0].tolist(), "labels": ids[0].tolist(), "position_ids": list(range(length))}
    return _peak_of(lambda: loop.evaluator.run(loop.engine.module, [sample]))


def _peak_of(work) -> int:
    """torch.profiler's memory events over work() (every allocation and free) summed in time order:
    the CPU analogue of torch.cuda.max_memory_allocated, relative to the start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
