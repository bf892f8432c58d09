"""Evaluation data: token ids from a .bin file, or from text read as training reads data.path.

    check_data(spec)                               # a missing local path fails before any model loads
    ids = bin_tokens("pg19_test.bin")              # ids of the tokenizer that wrote the file
    ids = text_tokens("books/", tokenizer)         # or a file, a glob, "hub:owner/name" (split "test")

Text comes through harness.data (the grammar and reader of data.path: .txt/.jsonl/.json/.parquet
files, folders, globs, hub:owner/name with a split and a text field); each document is
tokenized without special tokens and followed by EOS, in source order. Messages name --data.
"""
from __future__ import annotations

import glob
from pathlib import Path

import numpy as np

from harness.data.sources import HUB_PREFIX
from harness.evaluation.perplexity import EvaluationError

KEY = "--data"  # the option messages name


def check_data(spec: str) -> None:
    """A local path (or glob) that names nothing fails here, before any model loads."""
    local = str(Path(spec).expanduser())
    if not spec.startswith(HUB_PREFIX) and not Path(local).exists() and not glob.glob(local, recursive=True):
        raise EvaluationError(f"{KEY} {spec}: no such file or directory")


def is_bin(spec: str) -> bool:
    return spec.endswith(".bin")


def bin_tokens(spec: str) -> np.ndarray:
    from harness.data.tokens import read_tokens

    try:
        return read_tokens(spec)
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{KEY} {spec}: {error}") from None


def text_tokens(spec: str, tokenizer, *, split: str = "test", text_field: str = "text") -> np.ndarray:
    """(n,) int64: every document's ids then EOS, documents in source order."""
    from harness.data.pretrain import load_documents

    docs, _, _ = load_documents(tokenizer, spec, KEY, text_field=text_field, split=split, add_bos=False,
                                add_eos=True)
    return np.concatenate([np.asarray(ids, dtype=np.int64) for ids in docs["input_ids"]])
