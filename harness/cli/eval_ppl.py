"""`tools/eval_ppl.py --model M [--model M2 ...] --data DATA --seq-lens 1024,2048`: perplexity per length.

Each --model (with its --adapter, --label, --rope-factor, --position) is scored on the same data at every
length (harness.evaluation.compare_models); a table, and JSON and a plot on request.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from harness.cli.args import Parser, int_list, positive_int, run
from harness.cli.model_args import add_model_arguments, check_report_outputs, model_specs
from harness.evaluation.compare import PplSettings, compare_models
from harness.evaluation.perplexity import PROTOCOLS
from harness.evaluation.report import report_ppl

PROG = "tools/eval_ppl.py"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description="Perplexity of models at several context lengths.")
    add_model_arguments(parser, repeatable=True, model_required=False)  # --adapter alone names the base
    parser.add_argument("--label", action="append", help="name of each model in tables and plots; one per --model")
    parser.add_argument("--data", required=True,
                        help=".bin token file, or what data.path takes: a .txt/.jsonl/.json/.parquet file, a folder "
                             "or glob of them, or hub:owner/name")
    parser.add_argument("--split", default="test", help="split of a hub:owner/name dataset (default: test)")
    parser.add_argument("--text-field", default="text",
                        help="the field of JSON/parquet/hub records that holds the text (default: text)")
    parser.add_argument("--seq-lens", type=int_list, default=[1024, 2048, 4096, 8192],
                        help="comma-separated context lengths (default: 1024,2048,4096,8192)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="strided",
                        help="strided: every token scored once; longlora: LongLoRA eval.py windows")
    parser.add_argument("--stride", type=positive_int, help="strided protocol: window step (default: seq_len - 1)")
    parser.add_argument("--sliding-window", type=positive_int, default=256,
                        help="longlora protocol: window step (default: 256)")
    parser.add_argument("--max-tokens", type=positive_int, help="evaluate only the first N tokens of the data")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--plot", type=Path, help="draw perplexity against context length to this PNG")
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    return run(build_parser(prog), argv, _eval_ppl)


def _eval_ppl(args: argparse.Namespace) -> None:
    specs = model_specs(args, args.model, args.adapter, args.label, args.rope_factor, args.position)
    check_report_outputs(args, specs, args.data)
    settings = PplSettings(args.seq_lens, args.protocol, args.stride, args.sliding_window, args.max_tokens,
                           args.batch_size)
    records = compare_models(specs, args.data, settings, split=args.split, text_field=args.text_field)
    report_ppl(records, json_path=args.json, plot_path=args.plot)
