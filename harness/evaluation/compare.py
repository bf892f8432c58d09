"""Perplexity of several models on one data set at several context lengths: what
tools/eval_ppl.py and the demo show.

    models = [ModelSpec(base), ModelSpec(base, rope_factor=2), ModelSpec(base, adapter="runs/x/final")]
    records = compare_models(models, "held_out.txt", PplSettings(seq_lens=[4096, 8192]))
    report_ppl(records, json_path=Path("ppl.json"), plot_path=Path("ppl.png"))

Models load one at a time, each freed before the next. A .bin file holds ids of a fixed
tokenizer: it is read and checked once, before any model loads; text is tokenized by each
model's own tokenizer (harness.evaluation.data). Every length is checked against the data
before the first one is scored, so a length beyond the data fails in seconds, not after hours.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rich.console import Console

from harness.evaluation.data import bin_tokens, check_data, is_bin, text_tokens
from harness.evaluation.models import ModelSpec, free_memory, load_model
from harness.evaluation.perplexity import EvaluationError, evaluate_perplexity, longlora_windows, strided_windows
from harness.evaluation.report import PplRecord, progress_bar


@dataclass(frozen=True)
class PplSettings:
    """How each model is scored (harness.evaluation.perplexity's protocols)."""

    seq_lens: Sequence[int]
    protocol: str = "strided"  # strided | longlora
    stride: int | None = None  # strided: window step (None: seq_len - 1)
    sliding_window: int = 256  # longlora: window step
    max_tokens: int | None = None  # score only the first N tokens of the data
    batch_size: int = 1  # windows per forward pass


def compare_models(models: Sequence[ModelSpec], data: str, settings: PplSettings, *, split: str = "test",
                   text_field: str = "text") -> list[PplRecord]:
    """One PplRecord per model x length, models in order; `data` as harness.evaluation.data reads it."""
    check_data(data)
    fixed = bin_tokens(data) if is_bin(data) else None
    if fixed is not None:
        _check_lengths(settings, data, len(fixed))
    records = []
    for spec in models:
        model, tokenizer, label = load_model(spec)
        tokens = fixed if fixed is not None else text_tokens(data, tokenizer, split=split, text_field=text_field)
        _check_vocabulary(data, tokens, model, spec.model)
        _check_lengths(settings, data, len(tokens))
        records.extend(_records(model, tokens, label, spec.adapter, settings))
        del model, tokenizer
        free_memory()
    return records


def _check_vocabulary(data: str, tokens, model, model_name: str) -> None:
    """Ids past the embedding table (a .bin written with another tokenizer) would fail mid-run."""
    vocabulary = model.get_input_embeddings().num_embeddings
    largest = int(tokens.max())
    if largest >= vocabulary:
        raise EvaluationError(f"--data {data} holds token id {largest}, but --model {model_name} has {vocabulary} "
                              f"ids: the data was tokenized for another model")


def _check_lengths(settings: PplSettings, data: str, n: int) -> None:
    """Every length must give windows over the (capped) data."""
    n = min(n, settings.max_tokens or n)
    for seq_len in settings.seq_lens:
        try:
            if settings.protocol == "strided":
                strided_windows(n, seq_len, settings.stride)
            else:
                longlora_windows(n, seq_len, settings.sliding_window)
        except EvaluationError as error:
            raise EvaluationError(f"--seq-lens {seq_len} with --data {data}: {error}") from None


def _records(model, tokens, label: str, adapter: str | None, settings: PplSettings) -> list[PplRecord]:
    records = []
    for seq_len in settings.seq_lens:
        with progress_bar(f"{label} @ {seq_len}") as progress:
            result = evaluate_perplexity(model, tokens, seq_len, protocol=settings.protocol, stride=settings.stride,
                                         sliding_window=settings.sliding_window, max_tokens=settings.max_tokens,
                                         batch_size=settings.batch_size, progress=progress)
        Console(stderr=True).print(f"{label} seq_len={seq_len}: ppl {result.ppl:.4f} over {result.tokens:,} tokens")
        records.append(PplRecord.from_result(label, adapter, result))
    return records
