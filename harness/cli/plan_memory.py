"""`tools/plan_memory.py RECIPE [section.key=value ...] (--gpu CARD | --gib N)`: a recipe's peak GPU memory.

    python tools/plan_memory.py recipes/llama2_13b_12k.toml --gpu v100-32gb
    python tools/plan_memory.py recipes/llama2_7b_8k.toml data.max_seq_length=32768 position.target_length=32768 \
        --gib 24 --json
    python tools/plan_memory.py recipes/llama2_7b_8k.toml data.max_seq_length=524288 position.target_length=524288 \
        --gpu a100-80gb --gpus 8 \
        engine.name=deepspeed engine.deepspeed_config=launch/deepspeed/zero2_offload.json \\
        engine.sequence_parallel_size=8

Overrides are `section.key=value` as for training. The card is one of harness.memory.CARDS
or --gib N; --gpus N plans one of N cards of a launch (ZeRO partitions over them, and
engine.sequence_parallel_size shards each sequence over them). The model's shape comes from its
config.json (local, HF cache, init_config, the built-in table, or --config). Prints the
breakdown (the held-out evaluation's peak beside the step's: under PoSE the step at the window, the
evaluation at the target), the verdict, the longest sequence that fits, the longest target reached
trained at the target and with PoSE, what to change when it does not fit (sequence parallelism among
the changes when --gpus allows it), and one line when the evaluation does not fit where training
does; nothing is loaded.
"""
from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from harness.cli.args import Parser, UsageError, add_recipe_arguments, positive_int, run
from harness.memory import CARDS, plan, render
from harness.recipe import load_recipe

PROG = "tools/plan_memory.py"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description="Predict a recipe's peak GPU memory on a card, without loading the model.")
    add_recipe_arguments(parser)
    card = parser.add_mutually_exclusive_group()
    card.add_argument("--gpu", help=f"the card: {', '.join(CARDS)}")
    card.add_argument("--gib", help="a card with this many GiB instead of a named one")
    parser.add_argument("--seq-len", type=positive_int,
                        help="plan this training length instead of the recipe's (under PoSE: the window)")
    parser.add_argument("--gpus", type=positive_int, default=1,
                        help="cards in the launch (deepspeed --num_gpus N); the plan is one card's")
    parser.add_argument("--config", help="config.json of the model, when its shape is not otherwise known")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="plan a GPU (default) or a CPU run")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    return run(build_parser(prog), argv, _plan)


def _plan(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    result = plan(recipe, gpu_gib=_gib(args.gib), card=args.gpu, seq_len=args.seq_len, device=args.device,
                  config=args.config, cards=args.gpus)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        render(result, Console(width=None if sys.stdout.isatty() else 140))  # no 80-column squeeze in pipes


def _gib(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--gib {text!r} is not a number; give the card memory in GiB, e.g. --gib 24") from None
