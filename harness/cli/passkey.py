"""`tools/passkey.py --model M [--adapter DIR] --lengths 1024,2048 --depths 0,0.5,1`: passkey retrieval.

One model, `--trials` keys at every prompt length x key depth (harness.evaluation.passkey);
a table of accuracies, and JSON and a heatmap on request.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from harness.cli.args import Parser, UsageError, depth_list, int_list, positive_int, run
from harness.cli.model_args import add_model_arguments, check_report_outputs, model_specs
from harness.evaluation.models import load_model
from harness.evaluation.passkey import build_prompt, evaluate_passkey, passkeys
from harness.evaluation.perplexity import EvaluationError
from harness.evaluation.report import passkey_table, plot_passkey, progress_bar, write_passkey_json

PROG = "tools/passkey.py"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description="Passkey retrieval accuracy over lengths x depths.")
    add_model_arguments(parser, repeatable=False, model_required=False)  # --adapter alone names the base
    parser.add_argument("--lengths", type=int_list, default=[1024, 2048, 4096],
                        help="comma-separated prompt lengths in tokens (default: 1024,2048,4096)")
    parser.add_argument("--depths", type=depth_list, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="comma-separated key depths in [0, 1] (default: 0,0.25,0.5,0.75,1)")
    parser.add_argument("--trials", type=positive_int, default=5, help="keys per length and depth (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the keys (default: 0)")
    parser.add_argument("--json", type=Path, help="write the accuracies and every trial to this JSON file")
    parser.add_argument("--plot", type=Path, help="draw the accuracy heatmap to this PNG")
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    return run(build_parser(prog), argv, _passkey)


def _passkey(args: argparse.Namespace) -> None:
    [spec] = model_specs(args, [args.model] if args.model else None, [args.adapter] if args.adapter else None, None,
                         [args.rope_factor or 0.0], [args.position])
    check_report_outputs(args, [spec])
    model, tokenizer, label = load_model(spec)
    for length in args.lengths:  # a length too short for the bare prompt fails before any generation
        try:
            build_prompt(tokenizer, length, 0.0, passkeys(args.seed, 1)[0])
        except EvaluationError as error:
            raise UsageError(f"--lengths {length}: {error}") from None
    _note_past_the_window(model, label, args.lengths)
    with progress_bar(f"passkey {label}", unit="trial") as progress:
        result = evaluate_passkey(model, tokenizer, args.lengths, args.depths, args.trials, args.seed,
                                  progress=progress)
    Console().print(passkey_table(result))
    if args.json:
        write_passkey_json(result, args.json)
    if args.plot:
        plot_passkey(result, args.plot)


def _note_past_the_window(model, label: str, lengths: list[int]) -> None:
    """One line for the lengths past the model's window (in place of transformers' reminder at each call)."""
    from harness.generation import context_window

    window = context_window(model.config)
    past = [length for length in lengths if length > window.tokens]
    if past:
        print(f"note: --lengths {','.join(map(str, past))} past the window of {label}, {window.describe()}: "
              f"measured as asked", file=sys.stderr)
