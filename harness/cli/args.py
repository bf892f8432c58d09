"""What every command line shares: one-line errors, the run wrapper, the numeric argument types.

    parser = Parser(prog="tools/eval_ppl.py", description="...")
    parser.add_argument("--seq-lens", type=int_list)
    return run(parser, argv, body)        # body(args); a HarnessError -> one line, its exit code

Bad input, from argparse or from the library (any HarnessError), prints one line
`<prog>: error: <message>` to stderr and exits with the error's exit_code (2; a failed
verification: `<prog>: verification failed: <message>`, 1), never a traceback. Any other
exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from harness.errors import HarnessError


class UsageError(HarnessError):
    """A bad command line: one line that names the argument, its value and what is wrong."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(message)


def run(parser: argparse.ArgumentParser, argv: list[str] | None, body: Callable[[argparse.Namespace], None], *,
        intermixed: bool = False) -> int:
    """Parse `argv` (options and positionals mixed when `intermixed`), call body(args); 0 when it returns."""
    try:
        body(parser.parse_intermixed_args(argv) if intermixed else parser.parse_args(argv))
    except HarnessError as error:
        print(f"{parser.prog}: {error.headline}: {error}", file=sys.stderr)
        return error.exit_code
    return 0


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """RECIPE [section.key=value ...], as training takes them."""
    parser.add_argument("recipe", help="a recipe .toml file, e.g. recipes/tiny_cpu.toml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=10")


# --------------------------------------------------------------------------- argument types

def positive_int(text: str) -> int:
    return _checked(text, int, "an integer", lambda value: value > 0, "must be a positive integer")


def nonnegative_float(text: str) -> float:
    return _checked(text, float, "a number", lambda value: value >= 0, "must be >= 0")


def probability(text: str) -> float:
    return _checked(text, float, "a number", lambda value: 0 < value <= 1, "must lie in (0, 1]")


def int_list(text: str) -> list[int]:
    """"1024,2048" -> [1024, 2048]; every value a positive integer."""
    return _checked_list(text, int, "integers", lambda value: value > 0, "every value must be a positive integer")


def depth_list(text: str) -> list[float]:
    """"0,0.5,1" -> [0.0, 0.5, 1.0]; every value in [0, 1]."""
    return _checked_list(text, float, "numbers", lambda value: 0 <= value <= 1, "every depth must lie in [0, 1]")


def _checked(text: str, parse, what: str, valid, rule: str):
    """`parse(text)` when `valid` holds for it (NaN fails every comparison: refused), else argparse's error."""
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"{text!r} {rule}")
    return value


def _checked_list(text: str, parse, what: str, valid, rule: str) -> list:
    try:
        values = [parse(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None
    if not all(valid(value) for value in values):  # NaN fails every comparison: refused too
        raise argparse.ArgumentTypeError(f"{text!r}: {rule}")
    return values
