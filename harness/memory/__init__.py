"""Memory planner: the peak GPU memory of a recipe, predicted from the model config alone.

    from harness.memory import plan
    result = plan(load_recipe("recipes/llama2_13b_12k.toml"), gpu_gib=32)
    result.peak_bytes, result.fits, result.max_seq_len, result.suggestions

No weights are loaded: the shape comes from a config.json (a local directory, the HF cache,
`--config`), from `model.init_config` for "random", or from `KNOWN_SHAPES`. By job:

    shapes      cards and model shapes (LLAMA2_SHAPES, KNOWN_SHAPES, CARDS)
    runtime     the choices a run makes on the planned device (resolve_setup -> Setup)
    rules       each backend's memory rule (register_memory_rule), the built-in backends' included
    terms       the bytes of each tensor of a training step (weights, LoRA, saved activations, scores, loss)
    plans       what a plan is: its parts, their phases, the peak (MemoryPlan, EvalPlan, Reach)
    byte_model  the terms added up into the parts of a training step and of the held-out evaluation
                between steps (plan_setup -> MemoryPlan, its .evaluation an EvalPlan)
    advice      the longest sequence that fits, the longest target with and without PoSE (reach),
                suggestions, the rendered table
    measure     what the byte model is validated against: static bytes and torch's CPU allocator peak
                over any work (the training loop's steps and evaluation: harness.loop_memory; the
                planner never imports the training stack)
"""
from __future__ import annotations

import os

from harness.recipe import Recipe

from .advice import eval_verdict, longest_fitting, pose_window, reach, render, suggestions
from .byte_model import plan_setup
from .plans import EvalPlan, MemoryPlan, Reach
from .rules import register_memory_rule
from .runtime import BYTES, Setup, resolve_setup
from .shapes import (ALL_LINEAR, CARDS, KNOWN_SHAPES, LLAMA2_SHAPES, Card, ModelShape, PlanError, card_named,
                     custom_card, model_shape)
from .terms import attention_scores_bytes, layer_saved_per_token, lora_params, weight_bytes

__all__ = ["ALL_LINEAR", "BYTES", "CARDS", "KNOWN_SHAPES", "LLAMA2_SHAPES", "Card", "EvalPlan", "MemoryPlan",
           "ModelShape", "PlanError", "Reach", "Setup", "attention_scores_bytes", "eval_verdict",
           "layer_saved_per_token", "longest_fitting", "lora_params", "model_shape", "plan", "pose_window", "reach",
           "register_memory_rule", "render", "resolve_setup", "weight_bytes"]


def plan(recipe: Recipe, *, gpu_gib: float | None = None, seq_len: int | None = None, device: str = "cuda",
         card: str | None = None, config: str | os.PathLike | None = None, cards: int = 1) -> MemoryPlan:
    """Predict the peak memory of one training step of `recipe`, and of its held-out evaluation
    (result.evaluation: full attention at the length read per sample, the target under PoSE, no gradients;
    None when nothing is held out).

    gpu_gib or card (a CARDS name) gives the capacity: then `fits`, `max_seq_len` (the longest training
    sequence), `reach` (the longest target with and without PoSE) and `suggestions` are filled. seq_len
    overrides the recipe's training length (under PoSE the window); device "cpu"
    plans a CPU run (fp32, no CUDA context); config is a config.json
    for models whose shape is not otherwise known. cards: the ranks of the launch (one card's memory is
    planned; ZeRO partitions and engine.sequence_parallel_size work over them).
    """
    if device not in ("cuda", "cpu"):
        raise PlanError(f"device must be 'cuda' or 'cpu', got {device!r}")
    target = card_named(card) if card else custom_card(gpu_gib) if gpu_gib is not None else None
    shape = model_shape(recipe, config)
    if cards < 1:
        raise PlanError(f"--gpus {cards}: the number of cards must be at least 1")
    result = plan_setup(resolve_setup(recipe, shape, device=device, card=target, seq_len=seq_len, cards=cards), recipe)
    if target is not None:
        result.fits = result.peak_bytes <= target.total_bytes
        if result.evaluation is not None:
            result.evaluation.fits = result.evaluation.peak_bytes <= target.total_bytes
        result.max_seq_len = longest_fitting(recipe, shape, device, target, cards)
        result.reach = reach(recipe, shape, device, target, cards, seq_len)
        if not result.fits:
            result.suggestions = suggestions(recipe, shape, device, target, result, cards)
    return result
