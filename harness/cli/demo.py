"""`python -m harness demo [--data DIR] [--steps N] [--model auto|testbed|smollm2]` (`make demo`): see harness.demo."""
from __future__ import annotations

import argparse
from pathlib import Path

from harness.cli.args import Parser, run
from harness.demo import ROUTES, run_demo

PROG = "python -m harness demo"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description="Extend a model's context window (SmolLM2-135M 8k -> 16k on a GPU, the "
                                           "256-token testbed 4x on a CPU), then show it.")
    parser.add_argument("--data", type=Path, help="a folder of your own long documents to train on (default: "
                                                   "the public-domain books in recipes/data/books)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: 1000 for SmolLM2, 200 for the testbed)")
    parser.add_argument("--model", choices=ROUTES, default="auto",
                        help="auto (default): SmolLM2 on a GPU, the testbed on a CPU")
    parser.add_argument("--output", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    parser.add_argument("--eval-tokens", type=int,
                        help="held-out tokens scored at each length "
                             "(default: 16385 for SmolLM2, 20000 for the testbed)")
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    return run(build_parser(prog), argv, _demo)


def _demo(args: argparse.Namespace) -> None:
    run_demo(args.data, args.output, args.steps, args.eval_tokens, args.model)
