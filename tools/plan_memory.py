"""Predict a recipe's peak GPU memory on a card, without loading the model.

    python tools/plan_memory.py recipes/llama2_13b_12k.toml --gpu v100-32gb
    python tools/plan_memory.py recipes/llama2_7b_8k.toml data.max_seq_length=32768 --gib 24 --json

Overrides are `section.key=value` as for training. The card is one of harness.memory.CARDS
or --gib N; the model's shape comes from its config.json (local, HF cache, init_config,
the built-in table, or --config). Prints the breakdown, the verdict, the longest sequence
that fits and what to change when it does not. Bad input prints one line and exits with 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from harness.memory import CARDS, PlanError, plan, render  # noqa: E402
from harness.recipe import RecipeError, load_recipe  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise PlanError(f"{message} (see --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="the recipe .toml file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as for training")
    card = parser.add_mutually_exclusive_group()
    card.add_argument("--gpu", help=f"the card: {', '.join(CARDS)}")
    card.add_argument("--gib", help="a card with this many GiB instead of a named one")
    parser.add_argument("--seq-len", type=int, help="plan this sequence length instead of the recipe's")
    parser.add_argument("--config", help="config.json of the model, when its shape is not otherwise known")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="plan a GPU (default) or a CPU run")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of the table")
    return parser.parse_args(argv)


def _gib(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise PlanError(f"--gib {text!r} is not a number; give the card memory in GiB, e.g. --gib 24") from None


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    try:
        args = parse_args(argv)
        recipe = load_recipe(args.recipe, args.overrides)
        result = plan(recipe, gpu_gib=_gib(args.gib), card=args.gpu, seq_len=args.seq_len, device=args.device,
                      config=args.config)
    except (PlanError, RecipeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        render(result, Console(width=None if sys.stdout.isatty() else 140))  # no 80-column squeeze in pipes
    return 0


if __name__ == "__main__":
    sys.exit(main())
