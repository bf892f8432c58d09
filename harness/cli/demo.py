"""`python -m harness demo [--data DIR] [--steps N] [--output runs/demo]` (`make demo`): see harness.demo."""
from __future__ import annotations

import argparse
from pathlib import Path

from harness.cli.args import Parser, run
from harness.demo import run_demo

PROG = "python -m harness demo"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description="Extend SmolLM2-135M from 8k to 16k context, then show it.")
    parser.add_argument("--data", type=Path, help="a folder of your own long documents to train on")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: 1000 on a GPU, 4 on the CPU)")
    parser.add_argument("--output", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    parser.add_argument("--eval-tokens", type=int, default=16385, help="held-out tokens scored at each length")
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    return run(build_parser(prog), argv, _demo)


def _demo(args: argparse.Namespace) -> None:
    run_demo(args.data, args.output, args.steps, args.eval_tokens)
