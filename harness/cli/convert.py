"""`tools/convert.py zero-to-adapter CHECKPOINT OUT` and `tools/convert.py merge ADAPTER OUT`.

zero-to-adapter turns a ZeRO-2/3 checkpoint into a PEFT adapter directory (harness.zero_export);
merge adds an adapter (with its trainable embeddings and norms) to a 16-bit base and writes a
Hugging Face model with the extended rope in config.json, plus the tokenizer (harness.merge).
Bad input exits 2 with one line on stderr; a failed --verify exits 1. A table of what was
written follows success.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from typing import Iterator

from rich.console import Console
from rich.table import Table

from harness.cli.args import Parser, nonnegative_float, run
from harness.conversion import Report
from harness.merge import TOLERANCES, merge
from harness.zero_export import zero_to_adapter

PROG = "convert.py"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description="From checkpoint to usable model.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    zero = commands.add_parser("zero-to-adapter", help="ZeRO-2/3 checkpoint -> PEFT adapter directory")
    zero.add_argument("checkpoint", help="harness checkpoint dir, or a DeepSpeed folder with a latest file")
    zero.add_argument("out", help="adapter directory to write")
    zero.add_argument("--tag", help="DeepSpeed tag (default: the latest file)")
    zero.add_argument("--recipe", help="the run's recipe.toml when none lies beside the checkpoint")
    zero.add_argument("--base", help="base model (default: the recipe's model.name_or_path)")
    zero.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    merging = commands.add_parser("merge", help="adapter + base -> merged Hugging Face model (safetensors)")
    merging.add_argument("adapter", help="final/ or checkpoint directory, or zero-to-adapter output")
    merging.add_argument("out", help="model directory to write")
    merging.add_argument("--base", help="base model (default: the recipe's model.name_or_path)")
    merging.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="saved dtype")
    merging.add_argument("--base-weights", choices=("dequantized", "original"), default="dequantized",
                         help="merge into the NF4 round-tripped weights QLoRA trained against (default) "
                              "or into the original 16-bit weights")
    merging.add_argument("--verify", action="store_true",
                         help="compare merged logits with base + adapter; exit 1 on a mismatch")
    merging.add_argument("--tolerance", type=nonnegative_float,
                         help=f"--verify tolerance relative to max |logit| (default {TOLERANCES})")
    merging.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    return run(build_parser(prog), argv, _convert)


def _convert(args: argparse.Namespace) -> None:
    with _quiet_libraries():
        if args.command == "zero-to-adapter":
            report = zero_to_adapter(args.checkpoint, args.out, tag=args.tag, recipe_file=args.recipe,
                                     base=args.base, overwrite=args.overwrite)
        else:
            report = merge(args.adapter, args.out, base=args.base, dtype=args.dtype, base_weights=args.base_weights,
                           verify=args.verify, tolerance=args.tolerance, overwrite=args.overwrite)
    print_report(report, Console())


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Library warnings and progress bars off stderr while converting, so that an error is the one
    line there. Every setting is put back afterwards; the environment is never touched."""
    from transformers.utils import logging as transformers_logging

    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    bitsandbytes = logging.getLogger("bitsandbytes")
    level = bitsandbytes.level
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()  # transformers' and huggingface_hub's bars
    bitsandbytes.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations between peft and transformers
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
        bitsandbytes.setLevel(level)


def print_report(report: Report, console: Console) -> None:
    """Files written with their sizes, then what they hold: tensors, dtype, rope, provenance."""
    rope = report.rope["rope_parameters"]
    table = Table(title=f"Wrote {report.out}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for path in sorted(report.out.iterdir()):
        table.add_row(path.name, f"{path.stat().st_size / 2**20:.2f} MiB")
    table.add_section()
    table.add_row("tensors", f"{report.tensors} ({report.dtype})")
    table.add_row("rope", f"{rope.get('rope_type', 'default')} factor {rope.get('factor', 1.0)}, "
                          f"max_position_embeddings {report.rope['max_position_embeddings']}")
    for note in report.notes:
        key, _, value = note.partition(": ")
        table.add_row(key, value)
    if report.verification is not None:
        v = report.verification
        table.add_row("verified", f"max |diff| {v.max_abs_diff:.3g} <= tolerance {v.tolerance:.3g} "
                                  f"({v.tokens} tokens)")
    console.print(table)
