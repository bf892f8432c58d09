"""`tools/prepare_data.py --tokenizer T --input FILE_OR_DIR [...] --output OUT.bin`: text -> token file.

T is "builtin:bytes", a hub id, a local tokenizer directory or a .gguf file. Each input is
what data.path takes: a .txt/.jsonl/.json/.parquet file, a folder or glob of them, or
"hub:owner/name". Documents are read and checked as for training (bad records are warned
about with file:line and counted), get BOS/EOS as --add-bos/--add-eos say, and are written in
input order to a LongLoRA-style .bin file plus its OUT.bin.json sidecar.
"""
from __future__ import annotations

import argparse
import logging

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from harness.atomic import check_output
from harness.cli.args import Parser, run
from harness.data import DataError

PROG = "tools/prepare_data.py"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description="Tokenize text into a LongLoRA-style .bin token file.")
    parser.add_argument("--tokenizer", required=True, help='"builtin:bytes", hub id, local directory or .gguf file')
    parser.add_argument("--input", required=True, nargs="+", help='files, folders, globs or "hub:owner/name"')
    parser.add_argument("--output", required=True, help="the .bin file to write (sidecar: OUTPUT.json)")
    parser.add_argument("--text-field", default="text", help="the field of JSON/parquet records that holds the text")
    parser.add_argument("--split", default="train", help="split of hub datasets")
    parser.add_argument("--streaming", action="store_true", help="stream hub datasets instead of downloading them")
    parser.add_argument("--min-tokens", type=int, default=0, help="skip documents with fewer tokens")
    parser.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=True,
                        help="put BOS before each document")
    parser.add_argument("--add-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="put EOS after each document")
    parser.add_argument("--strict", action="store_true", help="fail on a malformed record instead of skipping it")
    parser.add_argument("--cache-dir", default="", help="tokenization cache (default ~/.cache/harness/datasets)")
    parser.add_argument("--num-proc", type=int, default=1, help="tokenization processes")
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    return run(build_parser(prog), argv, _prepare)


def _prepare(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s",  # the data warnings, with file:line
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)])
    _check_inputs_kept(args)
    tokenizer = _load_tokenizer(args.tokenizer)
    inputs = [_documents(tokenizer, source, args) for source in args.input]
    info = _write(args, tokenizer, inputs)
    Console().print(_summary(args, inputs, info))


def _check_inputs_kept(args: argparse.Namespace) -> None:
    """Neither the token file nor its sidecar lands on an input (harness.atomic.check_output)."""
    inputs = [("--input", source) for source in args.input] + [("--tokenizer", args.tokenizer)]
    for output in (args.output, args.output + ".json"):
        check_output("--output", output, inputs)


def _load_tokenizer(name: str):
    from harness.tokenizer import load_tokenizer

    try:
        return load_tokenizer(name)
    except (OSError, ValueError) as error:
        raise DataError(f"--tokenizer {name!r}: could not load it ({error})") from error


def _documents(tokenizer, source: str, args: argparse.Namespace):
    """(source, its tokenized documents)."""
    from harness.data.pretrain import load_documents

    docs, _, _ = load_documents(
        tokenizer, source, "--input", text_field=args.text_field, split=args.split, streaming=args.streaming,
        strict=args.strict, add_bos=args.add_bos, add_eos=args.add_eos, min_tokens=args.min_tokens,
        cache_dir=args.cache_dir, num_proc=args.num_proc,
    )
    return source, docs


def _write(args: argparse.Namespace, tokenizer, inputs: list) -> dict:
    from harness.data.tokens import write_tokens

    def documents():
        for _, docs in inputs:
            for batch in docs.iter(batch_size=256):
                yield from batch["input_ids"]

    return write_tokens(args.output, documents(), vocab_size=len(tokenizer), tokenizer_name=args.tokenizer)


def _summary(args: argparse.Namespace, inputs: list, info: dict) -> Table:
    table = Table(title=f"Wrote {args.output} ({info['dtype']}, tokenizer {args.tokenizer})")
    for column in ("input", "documents", "tokens"):
        table.add_column(column, justify="left" if column == "input" else "right")
    for source, docs in inputs:
        table.add_row(source, f"{len(docs):,}", f"{sum(docs['length']):,}")
    table.add_row("total", f"{info['num_documents']:,}", f"{info['num_tokens']:,}", style="bold")
    return table
