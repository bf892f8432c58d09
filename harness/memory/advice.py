"""Advice on a plan: the longest sequence that fits, the longest target with and without PoSE, the
changes that make a recipe fit, and the breakdown as a table.

    longest_fitting(recipe, shape, "cuda", card)       # tokens, a multiple of SEARCH_STEP
    reach(recipe, shape, "cuda", card)                 # Reach: the longest target trained at it / with PoSE
    suggestions(recipe, shape, "cuda", card, result)   # ["chunk the loss (...): 21.40 GiB", ...]
    render(result, console)                            # rich table (training and evaluation peaks) + verdict
    eval_verdict(result)                               # the line when the evaluation does not fit, or None

Sizes are shown in GiB (2**30 bytes), MiB and KiB.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable

from harness.recipe import Recipe

from .byte_model import GIB, plan_evaluation, plan_setup
from .plans import MemoryPlan, Part, Reach
from .runtime import resolve_setup
from .shapes import MIB, Card, ModelShape

SEARCH_STEP = 1024  # longest-sequence search: multiples of this many tokens
SEARCH_LIMIT = 16 * 1024 * SEARCH_STEP  # ... up to 16M tokens (sequence parallelism over many cards)
ROOT = Path(__file__).resolve().parents[2]  # the repository: launch/deepspeed/ holds the suggested ZeRO config


def _replan(recipe: Recipe, shape: ModelShape, device: str, card: Card, seq_len: int | None = None,
            cards: int = 1) -> MemoryPlan:
    return plan_setup(resolve_setup(recipe, shape, device=device, card=card, seq_len=seq_len, cards=cards), recipe)


def longest_fitting(recipe: Recipe, shape: ModelShape, device: str, card: Card, cards: int = 1) -> int:
    """The longest training sequence, a multiple of 1024 tokens, whose step fits (0 if not even 1024)."""
    return _longest(lambda length: _replan(recipe, shape, device, card, length, cards).peak_bytes <= card.total_bytes)


def _longest(fits: Callable[[int], bool]) -> int:
    """The longest multiple of SEARCH_STEP tokens up to SEARCH_LIMIT for which fits(tokens) holds, 0 if not
    even SEARCH_STEP: doubling, then bisection, so fits must hold up to a length and not past it (memory
    grows with L)."""
    if not fits(SEARCH_STEP):
        return 0
    low, high = 1, 2  # in steps
    while high * SEARCH_STEP <= SEARCH_LIMIT and fits(high * SEARCH_STEP):
        low, high = high, high * 2
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle * SEARCH_STEP) else (low, middle)
    return low * SEARCH_STEP


# --------------------------------------------------------------------------- the longest target, with PoSE

def reach(recipe: Recipe, shape: ModelShape, device: str, card: Card, cards: int = 1,
          seq_len: int | None = None) -> Reach:
    """The longest target `card` reaches trained at the target (contiguous), and trained with PoSE at
    pose_window's window (seq_len: the planned training length, the recipe's when None). Under PoSE training
    computes the window whatever the target, so the limit is the no-grad full-attention forward at the
    target that the evaluation runs (and serving needs); trained at the target, that forward must fit too."""
    window, source = pose_window(recipe, seq_len or recipe.resolved.seq_len)
    fit = functools.partial(_train_and_forward_fit, recipe, shape, device, card, cards)
    return Reach(contiguous=_longest(lambda target: fit(target, target)),
                 pose=_longest(lambda target: fit(window, target)), window=window, window_source=source,
                 window_peak=_replan(recipe, shape, device, card, window, cards).peak_bytes)


def pose_window(recipe: Recipe, length: int) -> tuple[int, str]:
    """(the PoSE training window, why it): a PoSE recipe's own (length, its planned training length); else
    the model's original context when shorter than `length` (PoSE's setting: train in the window the base
    was pretrained at), else a quarter of `length`."""
    if recipe.layout.name != "contiguous":
        return length, "the recipe's training window"
    original = recipe.resolved.original_context
    if 0 < original < length:
        return original, "the original context"
    return max(length // 4, 1), "a quarter of the planned length"


def _train_and_forward_fit(recipe: Recipe, shape: ModelShape, device: str, card: Card, cards: int, train_len: int,
                           target: int) -> bool:
    """Whether a training step at train_len and the no-grad full-attention forward of a 1 x target sample
    beside what training keeps between steps (byte_model.plan_evaluation) both fit the card."""
    setup = resolve_setup(recipe, shape, device=device, card=card, seq_len=train_len, cards=cards, eval_len=target)
    return max(plan_setup(setup, recipe).peak_bytes, plan_evaluation(setup).peak_bytes) <= card.total_bytes


def _with(recipe: Recipe, table: str, **values) -> Recipe:
    return dataclasses.replace(recipe, **{table: dataclasses.replace(getattr(recipe, table), **values)})


def suggestions(recipe: Recipe, shape: ModelShape, device: str, card: Card, current: MemoryPlan,
                cards: int = 1) -> list[str]:
    """Ordered changes, each applied on top of the previous ones that helped, until it fits."""
    changes = [
        ("enable gradient checkpointing (train.gradient_checkpointing=true)",
         lambda r: _with(r, "train", gradient_checkpointing=True)),
        ("chunk the loss (train.chunked_loss=true)", lambda r: _with(r, "train", chunked_loss=True)),
        ("use a fused attention kernel (attention.kernel=\"sdpa\")", lambda r: _with(r, "attention", kernel="sdpa")),
        ("train with S2 attention (attention.name=\"s2\")", lambda r: _with(r, "attention", name="s2")),
        ("offload the optimizer with ZeRO (engine.name=\"deepspeed\", "
         "engine.deepspeed_config=\"launch/deepspeed/zero2_offload.json\")", _zero_offload),
        (f"micro-batch 1 (train.micro_batch_size=1, train.grad_accum="
         f"{recipe.train.micro_batch_size * recipe.train.grad_accum})",
         lambda r: _with(r, "train", micro_batch_size=1, grad_accum=r.train.micro_batch_size * r.train.grad_accum)),
        ("tile the MLP (train.tiled_mlp=true)", lambda r: _with(r, "train", tiled_mlp=True)),
    ]
    out, best, peak = [], recipe, current.peak_bytes
    for text, change in changes:
        candidate = change(best)
        result = _replan(candidate, shape, device, card, current.seq_len, cards)
        if result.peak_bytes >= peak:
            continue  # already so, or no help for this recipe
        best, peak = candidate, result.peak_bytes
        out.append(f"{text}: {_gib(peak)}")
        if peak <= card.total_bytes:
            return out
    if device == "cuda" and best.train.gradient_checkpointing and not best.train.offload_activations:
        best = _with(best, "train", offload_activations=True)
        peak = _replan(best, shape, device, card, current.seq_len, cards).peak_bytes
        out.append(f"offload the checkpointed hidden states to CPU RAM (train.offload_activations=true): {_gib(peak)}")
        if peak <= card.total_bytes:
            return out
    best, peak, text = _sequence_parallel_suggestion(best, shape, device, card, current.seq_len, cards, peak)
    if text:
        out.append(text)
        if peak <= card.total_bytes:
            return out
    longest = longest_fitting(best, shape, device, card, cards)
    out.append(f"train on shorter sequences: up to {longest} tokens fit" if longest
               else "no sequence length fits: use a card with more memory")
    return out


def _sequence_parallel_suggestion(recipe: Recipe, shape: ModelShape, device: str, card: Card, seq_len: int,
                                  cards: int, peak: int) -> tuple[Recipe, int, str]:
    """The smallest engine.sequence_parallel_size the cards and heads allow that fits, else the largest
    (when it helps): (recipe, peak, suggestion) or (recipe, peak, "") when none applies."""
    from harness.backends.sequence_parallel import SequenceParallelError, check_heads

    sizes = [n for n in range(recipe.engine.sequence_parallel_size + 1, cards + 1) if cards % n == 0]
    found = None
    for size in sizes:
        try:
            check_heads(shape.heads, shape.kv_heads, size)
        except SequenceParallelError:
            continue
        candidate = _with(_zero_offload(recipe) if recipe.engine.name != "deepspeed" else recipe, "engine",
                          sequence_parallel_size=size)
        found = candidate, _replan(candidate, shape, device, card, seq_len, cards).peak_bytes, size
        if found[1] <= card.total_bytes:
            break
    if found is None or found[1] >= peak:
        return recipe, peak, ""
    candidate, new_peak, size = found
    return candidate, new_peak, (f"shard each sequence over {size} cards (engine.sequence_parallel_size={size}, "
                                 f"deepspeed --num_gpus {cards}): {_gib(new_peak)}")


def _zero_offload(recipe: Recipe) -> Recipe:
    return _with(_with(recipe, "engine", name="deepspeed",
                       deepspeed_config=str(ROOT / "launch" / "deepspeed" / "zero2_offload.json")),
                 "train", optimizer="auto")


def _gib(size: int) -> str:
    return f"{size / GIB:.2f} GiB"


# --------------------------------------------------------------------------- rendering

def render(result: MemoryPlan, console) -> None:
    """The breakdown as a rich table (the evaluation's peak beside the step's), then the verdict."""
    from rich.table import Table

    s, evaluation = result.shape, result.evaluation
    title = (f"{Path(result.recipe).name or 'recipe'}: {s.layers} layers, d={s.hidden}, V={s.vocab}; "
             f"B={result.batch}, L={result.seq_len}{_parallel_title(result)}, peak in the {result.peak_phase} phase")
    if evaluation is not None:
        length = "L" if evaluation.seq_len == result.seq_len else evaluation.seq_len  # PoSE: the target
        title += f"; evaluation (1 x {length}, full attention, no grad) peaks in the {evaluation.peak_phase} phase"
    table = Table(title=title, show_footer=True)
    table.add_column("component", footer="peak")
    table.add_column("at peak", justify="right", footer=_gib(result.peak_bytes))
    if evaluation is not None:
        table.add_column("at eval peak", justify="right", footer=_gib(evaluation.peak_bytes))
    table.add_column("own size", justify="right")
    table.add_column("CPU RAM", justify="right", footer=_gib(result.cpu_bytes) if result.cpu_bytes else "")
    table.add_column("note")
    for row in _rows(result):
        table.add_row(*row)
    console.print(table)
    console.print(f"model shape from {s.source}; torch allocator peak (no CUDA overhead, no paged states): "
                  f"{_gib(result.allocated_bytes)}", soft_wrap=True)
    if result.fits is None:
        return
    verdict = "[green]fits[/]" if result.fits else "[red]does not fit[/]"
    console.print(f"Verdict: {verdict} on {result.card} ({_gib(result.capacity_bytes)}): "
                  f"predicted peak {_gib(result.peak_bytes)}{_eval_peak(result)}. Longest sequence that fits: "
                  f"{result.max_seq_len or 'none'} tokens (multiples of {SEARCH_STEP}).", soft_wrap=True)
    if result.reach is not None:
        console.print(reach_line(result), soft_wrap=True)
    warning = eval_verdict(result)
    if warning:
        console.print(f"[yellow]{warning}[/]", soft_wrap=True)
    for number, text in enumerate(result.suggestions, 1):
        console.print(f"  {number}. {text}", soft_wrap=True)


def _rows(result: MemoryPlan) -> list[tuple[str, ...]]:
    """The step's parts (with what each holds at the evaluation's peak), then the evaluation's own."""
    evaluation = result.evaluation

    def row(part: Part, step: str, at_eval: str) -> tuple[str, ...]:
        cpu = _size(part.cpu_bytes) if part.cpu_bytes else ""
        return (part.name, step, *([at_eval] if evaluation else []), _size(part.bytes), cpu, part.note)

    if evaluation is None:
        return [row(part, _size(result.at_peak(part)), "") for part in result.parts]
    kept = {part.name: evaluation.at_peak(part) for part in evaluation.parts}
    own = [part for part in evaluation.parts if part.dynamic]
    return ([row(part, _size(result.at_peak(part)), _size(kept.get(part.name, 0))) for part in result.parts]
            + [row(part, "", _size(evaluation.at_peak(part))) for part in own])


def _eval_peak(result: MemoryPlan) -> str:
    evaluation = result.evaluation
    if evaluation is None:
        return ""
    verdict = "fits" if evaluation.fits else "does not fit"
    at = f" at {evaluation.seq_len} tokens" if evaluation.seq_len != result.seq_len else ""  # PoSE: the target
    return f", the held-out evaluation's {_gib(evaluation.peak_bytes)}{at} ({verdict})"


def reach_line(result: MemoryPlan) -> str:
    """The longest target trained at it and with PoSE, the window PoSE trains and its step's peak, as one line."""
    r = result.reach
    fits = r.window_peak <= result.capacity_bytes
    then = "; the forward at the target is then the limit" if fits and r.pose else "" if fits else " and does not fit"
    return (f"Longest target on {result.card} (multiples of {SEARCH_STEP}, the full-attention forward at the target "
            f"included): {r.contiguous or 'none'} tokens trained at the target, {r.pose or 'none'} with PoSE "
            f"(layout.name = \"pose\") training a window of {r.window} tokens ({r.window_source}), whose step peaks at "
            f"{_gib(r.window_peak)}{then}.")


def eval_verdict(result: MemoryPlan) -> str | None:
    """One line when the held-out evaluation (full attention at the length, no gradients) does not fit
    the card where the training step does: what the harness does then (harness.loop_eval.Evaluations
    ._evaluate_within_memory) and how to avoid it."""
    evaluation = result.evaluation
    if evaluation is None or evaluation.fits is not False or not result.fits:
        return None
    then = ("on several ranks an evaluation that runs out of GPU memory stops the run" if result.cards > 1 else
            "the first evaluation that runs out of GPU memory is skipped with a warning, the rest of the run "
            "evaluates nothing (the long-context watch reads nothing) and training goes on")
    return (f"The held-out evaluation does not fit: full attention at {evaluation.seq_len} tokens without gradients "
            f"peaks at {_gib(evaluation.peak_bytes)} ({evaluation.peak_phase} phase) where the step peaks at "
            f"{_gib(result.peak_bytes)}; {then}. Turn the watch off with train.eval_holdout=0 and data.eval_path "
            f"unset, or evaluate afterwards with tools/eval_ppl.py.")


def _parallel_title(result: MemoryPlan) -> str:
    """", one of 8 cards, L/4 per card (sequence_parallel_size = 4), tiled MLP" as it applies."""
    text = f", one of {result.cards} cards" if result.cards > 1 else ""
    if result.sequence_parallel > 1:
        text += f", L/{result.sequence_parallel} per card (sequence_parallel_size = {result.sequence_parallel})"
    return text + (", tiled MLP" if result.tiled_mlp else "")


def _size(size: int) -> str:
    if size >= GIB / 4:
        return f"{size / GIB:.2f} GiB"
    return f"{size / MIB:.1f} MiB" if size >= MIB else f"{size / 1024:.1f} KiB"
