"""Every command line, one module each; `python -m harness COMMAND ...` (or `harness COMMAND`) runs them.

    train         launch/train.py         train a recipe (every launcher starts it)
    demo                                  `make demo`: extend SmolLM2-135M to 16k and show it
    eval_ppl      tools/eval_ppl.py       perplexity of models at several context lengths
    passkey       tools/passkey.py        passkey retrieval accuracy over lengths x depths
    convert       tools/convert.py        ZeRO checkpoint -> adapter; adapter + base -> merged model
    plan_memory   tools/plan_memory.py    a recipe's peak GPU memory, without loading the model
    prepare_data  tools/prepare_data.py   text -> a .bin token file
    backends                              the registered backends and their dependencies
    generate      tools/generate.py       text from an extended model, streamed; --chat to talk

Each module has `main(argv=None, prog=...) -> int` built on harness.cli.args: bad input is
one line on stderr and exit status 2. The scripts in launch/ and tools/ only call these.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = ("train", "demo", "eval_ppl", "passkey", "convert", "plan_memory", "prepare_data", "backends",
            "generate")


def main(argv: list[str] | None = None) -> int:
    """`python -m harness COMMAND [ARGS ...]`: the command's module runs ARGS."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m harness {{{','.join(COMMANDS)}}} [ARGS ...]  (COMMAND --help for its ARGS)",
              file=sys.stderr)
        return 2
    command = importlib.import_module(f"harness.cli.{argv[0]}")  # one command's imports, not all of them
    return command.main(argv[1:], prog=f"python -m harness {argv[0]}")
