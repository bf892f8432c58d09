"""The models an evaluation runs: what to load (ModelSpec) and loading it, one at a time.

    spec = ModelSpec("meta-llama/Llama-2-7b-hf", adapter="runs/x/final")
    model, tokenizer, label = load_model(spec)
    ...
    del model, tokenizer
    free_memory()

A spec is a base (hub id, HF directory or .gguf file), optionally with an adapter or
checkpoint directory, or with a zero-shot rope stretch (`rope_factor`, by the position backend
`position`: linear PI unless named); harness.model.load_for_eval
builds it. Messages name the evaluation tools' options (--model, --adapter).
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

from harness.errors import HarnessError, first_line
from harness.evaluation.perplexity import EvaluationError


@dataclass(frozen=True)
class ModelSpec:
    model: str  # "" with an adapter: the base its saved recipe names
    adapter: str | None = None
    label: str | None = None  # None: the label load_for_eval gives
    rope_factor: float = 0.0  # zero-shot stretch without an adapter; 0: the model's own rope
    position: str = "linear"  # the position backend that stretches by rope_factor: linear, dynamic, yarn, llama3
    tokenizer: str | None = None  # override: hub id, directory or builtin:bytes
    load_in_4bit: bool = False
    attention: str = "full"  # full | s2


def load_model(spec: ModelSpec):
    """(model, tokenizer, label); any load failure is one EvaluationError naming the spec."""
    from harness.model import load_for_eval

    try:
        model, tokenizer, label = load_for_eval(spec.model, adapter=spec.adapter, load_in_4bit=spec.load_in_4bit,
                                                attention=spec.attention, tokenizer=spec.tokenizer,
                                                rope_factor=spec.rope_factor, position=spec.position)
    except HarnessError:  # already a message for the user
        raise
    except Exception as error:  # noqa: BLE001 - any failure of the loaders is reported, not a traceback
        where = f"--model {spec.model}" + (f" --adapter {spec.adapter}" if spec.adapter else "")
        raise EvaluationError(f"{where}: cannot load it: {type(error).__name__}: {first_line(error)}") from None
    return model, tokenizer, spec.label or label


def free_memory() -> None:
    """Return a dropped model's memory before the next one loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

