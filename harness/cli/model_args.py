"""The model options of tools/eval_ppl.py (repeatable, to compare) and tools/passkey.py (one model).

    --model M [--adapter DIR|none] [--rope-factor F] [--label L] ...   -> [ModelSpec, ...]
    --tokenizer T  --load-in-4bit  --attention full|s2                 (shared by every model)

A value that can only be a local path (harness.base_model.looks_local) must exist, and an
--adapter must be a directory: checked before anything loads.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from harness.base_model import looks_local
from harness.cli.args import UsageError
from harness.evaluation.models import ModelSpec


def add_model_arguments(parser: argparse.ArgumentParser, *, repeatable: bool, model_required: bool = True) -> None:
    many = dict(action="append") if repeatable else {}
    each = "; one per --model, in order" if repeatable else ""
    compare = "; repeat to compare" if repeatable else ""
    parser.add_argument("--model", required=model_required, **many, help="hub id, Hugging Face directory or .gguf file" + compare)
    parser.add_argument("--adapter", **many, help="adapter or checkpoint directory, or 'none'" + each)
    parser.add_argument("--rope-factor", **many, type=float,
                        help="zero-shot linear PI factor for a model without adapter (0: its own rope)" + each)
    parser.add_argument("--tokenizer", help="tokenizer override (hub id, directory or builtin:bytes)")
    parser.add_argument("--load-in-4bit", action="store_true", help="load the base weights in 4-bit NF4")
    parser.add_argument("--attention", choices=("full", "s2"), default="full",
                        help="attention at inference (default: full)")


def model_specs(args: argparse.Namespace, models: list[str] | None, adapters: list[str] | None,
                labels: list[str | None] | None, rope_factors: list[float] | None) -> list[ModelSpec]:
    """--model values paired with their --adapter ('none': no adapter), --label and --rope-factor values.
    Without --model, each --adapter's saved recipe names its base: settings are never typed twice."""
    if not models:
        if not adapters or any(a.lower() == "none" for a in adapters):
            raise UsageError("give --model, or --adapter DIR alone (the base model comes from its saved recipe)")
        models = [""] * len(adapters)
    adapters = adapters or ["none"] * len(models)
    labels = labels or [None] * len(models)
    rope_factors = rope_factors or [0.0] * len(models)
    for flag, values in (("--adapter", adapters), ("--label", labels), ("--rope-factor", rope_factors)):
        if len(values) != len(models):
            raise UsageError(f"{flag} is given {len(values)} times for {len(models)} --model: give one per --model")
    specs = [ModelSpec(model, adapter=None if adapter.lower() == "none" else adapter, label=label, rope_factor=factor,
                       tokenizer=args.tokenizer, load_in_4bit=args.load_in_4bit, attention=args.attention)
             for model, adapter, label, factor in zip(models, adapters, labels, rope_factors)]
    for spec in specs:
        check_local("--model", spec.model)
        if spec.adapter and not Path(spec.adapter).is_dir():
            raise UsageError(f"--adapter {spec.adapter}: no such directory")
    if args.tokenizer:
        check_local("--tokenizer", args.tokenizer)
    return specs


def check_local(flag: str, value: str) -> None:
    if looks_local(value) and not Path(value).expanduser().exists():
        raise UsageError(f"{flag} {value}: no such file or directory")
