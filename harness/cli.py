"""Command lines: `launch/train.py` and `python -m harness` share these entry points."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from harness.recipe import Recipe, RecipeError, load_recipe

def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/train.py", description="Train a LongQLoRA recipe.")
    parser.add_argument("recipe", help="a recipe .toml file, e.g. recipes/tiny_cpu.toml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=10")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved recipe; load nothing")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (train.resume=auto)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return parser


def train_main(argv: list[str]) -> int:
    args = train_parser().parse_intermixed_args(argv)
    console = Console(stderr=True)
    overrides = list(args.overrides) + (['train.resume="auto"'] if args.resume else [])
    try:
        recipe = load_recipe(args.recipe, overrides)
        if args.dry_run:
            Console().print(recipe_table(recipe))
            return 0
        from harness.train import train

        train(recipe)
    except harness_errors() as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False)
        return 2
    return 0


def harness_errors() -> tuple[type[Exception], ...]:
    """Errors that carry a user-facing message: printed, never shown as a traceback."""
    from harness.errors import HarnessError

    return (HarnessError,)


def recipe_table(recipe: Recipe) -> Table:
    table = Table(title=f"Resolved recipe: {recipe.source}")
    table.add_column("key")
    table.add_column("value", overflow="fold")
    for section, values in recipe.to_dict().items():
        style = "bold cyan" if section == "resolved" else ""
        for key, value in values.items():
            table.add_row(f"{section}.{key}", repr(value), style=style)
    return table


def backends_table() -> Table:
    from harness import registry

    table = Table(title="Backends")
    for column in ("kind", "name", "description", "dependencies"):
        table.add_column(column)
    for backend in registry.all_backends():
        missing = backend.missing()
        status = f"[red]missing: {', '.join(missing)}[/]" if missing else "[green]present[/]"
        table.add_row(backend.kind, backend.name, backend.description, status)
    return table


def main(argv: list[str] | None = None) -> int:
    """`python -m harness backends | train RECIPE ...`"""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["backends"]:
        Console().print(backends_table())
        return 0
    if argv[:1] == ["demo"]:
        from harness.demo import demo_main

        try:
            return demo_main(argv[1:])
        except harness_errors() as error:
            Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False)
            return 2
    if argv[:1] == ["train"]:
        return train_main(argv[1:])
    print("usage: python -m harness backends | demo | train RECIPE [section.key=value ...] [--dry-run]", file=sys.stderr)
    return 2
