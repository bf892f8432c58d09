"""`launch/train.py RECIPE [section.key=value ...] [--dry-run] [--resume]`: train a recipe.

Every launcher starts this (python, accelerate launch, torchrun, deepspeed); `--dry-run`
prints the resolved recipe and loads nothing.
"""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from harness.cli.args import Parser, add_recipe_arguments, run
from harness.recipe import Recipe, load_recipe

PROG = "launch/train.py"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description="Train a LongQLoRA recipe.")
    add_recipe_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved recipe; load nothing")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (train.resume=auto)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    return run(build_parser(prog), argv, _train, intermixed=True)


def exit_process(code: int) -> None:
    """End a training process with `code`, skipping the interpreter's own teardown.

    gloo's TCP loop threads outlive destroy_process_group() (they stop with the last reference to
    their group, and torch keeps one). At interpreter exit their C++ destructors raced the peer's
    closing sockets: `terminate called without an active exception`, and the deepspeed launcher
    exited 250 after a run had written its adapter (docs/faults.md). By now the run has written
    and closed everything and torn its engine down; the streams and logging are flushed here."""
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _train(args: argparse.Namespace) -> None:
    overrides = list(args.overrides) + (['train.resume="auto"'] if args.resume else [])
    recipe = load_recipe(args.recipe, overrides)
    if args.dry_run:
        Console().print(recipe_table(recipe))
        _print_layout(recipe)
        return
    from harness.train import train  # torch and the model stack: only past a dry run

    train(recipe)


def _print_layout(recipe: Recipe) -> None:
    """What a skipping layout (PoSE) will train, as the run's start says it."""
    from harness.session import make_layout

    described = make_layout(recipe).describe(recipe.resolved.sample_length)
    if described:
        Console().print(described)


def recipe_table(recipe: Recipe) -> Table:
    table = Table(title=f"Resolved recipe: {recipe.source}")
    table.add_column("key")
    table.add_column("value", overflow="fold")
    for section, values in recipe.to_dict().items():
        style = "bold cyan" if section == "resolved" else ""
        for key, value in values.items():
            table.add_row(f"{section}.{key}", repr(value), style=style)
    return table
