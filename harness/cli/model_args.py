"""The model options of tools/eval_ppl.py (repeatable, to compare) and tools/passkey.py (one model).

    --model M [--adapter DIR|none] [--rope-factor F [--position NAME]] [--label L] ...   -> [ModelSpec, ...]
    --tokenizer T  --load-in-4bit  --attention full|s2                 (shared by every model)

A value that can only be a local path (harness.base_model.looks_local) must exist, and an
--adapter must be a directory: checked before anything loads.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from harness.base_model import looks_local
from harness.cli.args import UsageError
from harness.evaluation.models import ModelSpec


def add_model_arguments(parser: argparse.ArgumentParser, *, repeatable: bool, model_required: bool = True) -> None:
    many = dict(action="append") if repeatable else {}
    each = "; one per --model, in order" if repeatable else ""
    compare = "; repeat to compare" if repeatable else ""
    parser.add_argument("--model", required=model_required, **many,
                        help="hub id, Hugging Face directory or .gguf file" + compare)
    parser.add_argument("--adapter", **many, help="adapter or checkpoint directory, or 'none'" + each)
    parser.add_argument("--rope-factor", **many, type=float,
                        help="zero-shot rope factor for a model without adapter (0: its own rope)" + each)
    parser.add_argument("--position", **many, metavar="NAME",
                        help="how --rope-factor stretches the rope: a position backend, e.g. linear (PI, the "
                             "default), dynamic, yarn, llama3" + each)
    parser.add_argument("--tokenizer", help="tokenizer override (hub id, directory or builtin:bytes)")
    parser.add_argument("--load-in-4bit", action="store_true", help="load the base weights in 4-bit NF4")
    parser.add_argument("--attention", choices=("full", "s2"), default="full",
                        help="attention at inference (default: full)")


def model_specs(args: argparse.Namespace, models: list[str] | None, adapters: list[str] | None,
                labels: list[str | None] | None, rope_factors: list[float] | None,
                positions: list[str | None] | None = None) -> list[ModelSpec]:
    """--model values paired with their --adapter ('none': no adapter), --label, --rope-factor and
    --position values. Without --model, each --adapter's saved recipe names its base: settings are
    never typed twice."""
    if not models:
        if not adapters or any(a.lower() == "none" for a in adapters):
            raise UsageError("give --model, or --adapter DIR alone (the base model comes from its saved recipe)")
        models = [""] * len(adapters)
    adapters = adapters or ["none"] * len(models)
    labels = labels or [None] * len(models)
    rope_factors = rope_factors or [0.0] * len(models)
    positions = positions or [None] * len(models)
    for flag, values in (("--adapter", adapters), ("--label", labels), ("--rope-factor", rope_factors),
                         ("--position", positions)):
        if len(values) != len(models):
            raise UsageError(f"{flag} is given {len(values)} times for {len(models)} --model: give one per --model")
    specs = [ModelSpec(model, adapter=None if adapter.lower() == "none" else adapter, label=label, rope_factor=factor,
                       position=_position(position, factor, adapter), tokenizer=args.tokenizer,
                       load_in_4bit=args.load_in_4bit, attention=args.attention)
             for model, adapter, label, factor, position in zip(models, adapters, labels, rope_factors, positions)]
    for spec in specs:
        check_local("--model", spec.model)
        if spec.adapter and not Path(spec.adapter).is_dir():
            raise UsageError(f"--adapter {spec.adapter}: no such directory")
    if args.tokenizer:
        check_local("--tokenizer", args.tokenizer)
    return specs


def _position(name: str | None, factor: float, adapter: str) -> str:
    """A --position value (linear unless given): a stretching position backend, and only where
    --rope-factor gives a stretch, checked with the factor itself."""
    if factor and not (math.isfinite(factor) and factor >= 1):
        raise UsageError(f"--rope-factor {factor:g} must be a finite number >= 1 (below 1 it would shrink the rope; "
                         f"0: the model's own rope)")
    if factor and adapter.lower() != "none":
        raise UsageError(f"--rope-factor {factor:g} with --adapter {adapter}: the adapter's saved recipe sets its "
                         f"rope; drop --rope-factor (it would be ignored)")
    if name is None:
        return "linear"
    from harness import registry

    stretches = [known for known in registry.names("position") if known != "none"]
    if name not in stretches:
        raise UsageError(f"--position {name!r} is not one of {', '.join(stretches)}")
    if adapter.lower() != "none":
        raise UsageError(f"--position {name} with --adapter {adapter}: the adapter's saved recipe sets its rope; "
                         f"drop --position")
    if not factor:
        raise UsageError(f"--position {name} needs --rope-factor F, the stretch (e.g. 2 for twice the window)")
    return name


def check_report_outputs(args: argparse.Namespace, specs: list[ModelSpec], data: str | None = None) -> None:
    """--json and --plot, before anything loads: never on an input (a model, an adapter, the data and a
    token file's sidecar) nor on each other, writable, and a plot in a format matplotlib writes."""
    from harness.atomic import check_output
    from harness.data.tokens import sidecar_path
    from harness.evaluation.report import check_plot_path

    inputs = [("--model", spec.model) for spec in specs] + [("--adapter", spec.adapter) for spec in specs]
    inputs += [("--tokenizer", args.tokenizer), ("--data", data)]
    if data and data.endswith(".bin"):
        inputs.append(("--data's sidecar", str(sidecar_path(data))))
    if args.json:
        check_output("--json", args.json, inputs)
    if args.plot:
        check_plot_path("--plot", args.plot)
        check_output("--plot", args.plot, inputs)
    if args.json and args.plot and args.json.expanduser().resolve() == args.plot.expanduser().resolve():
        raise UsageError(f"--json and --plot are both {args.json}: the figure would replace the results; give "
                         f"two names")


def check_local(flag: str, value: str) -> None:
    if looks_local(value) and not Path(value).expanduser().exists():
        raise UsageError(f"{flag} {value}: no such file or directory")
