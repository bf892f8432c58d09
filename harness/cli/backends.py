"""`python -m harness backends`: every registered backend and whether its dependencies are installed."""
from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from harness import registry
from harness.cli.args import Parser, run

PROG = "python -m harness backends"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    parser = Parser(prog=prog, description="List the backends and their dependencies.")
    return run(parser, argv, _show)


def _show(args: argparse.Namespace) -> None:
    Console().print(backends_table())


def backends_table() -> Table:
    table = Table(title="Backends")
    for column in ("kind", "name", "description", "dependencies"):
        table.add_column(column)
    for backend in registry.all_backends():
        missing = backend.missing()
        status = f"[red]missing: {', '.join(missing)}[/]" if missing else "[green]present[/]"
        table.add_row(backend.kind, backend.name, backend.description, status)
    return table
