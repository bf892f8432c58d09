"""Pretraining on long documents: read, tokenize (cached), filter by length, truncate or pack.

BOS/EOS: a document is tokenized without the tokenizer's own special tokens, then gets BOS in
front (data.add_bos) and EOS at the end (data.add_eos), so every tokenizer is treated alike
whatever its add_special_tokens default. A tokenizer without BOS (e.g. Qwen) gets none, with
a warning. Token counts (data.min_tokens, the length report) include these tokens; a truncated
document loses its tail, EOS included.

Modes:
- ``truncate`` (the paper): one document per sample, cut to max_seq_length; labels are the
  input ids (the model shifts them); position_ids 0..n-1.
- ``pack``: documents, in source order, are concatenated and cut into rows of max_seq_length;
  a document that does not fit the rest of a row continues in the next one. position_ids
  restart at 0 at each document piece, which is how the attention (transformers reads packed
  sequences from position_ids when no attention_mask is given) never crosses documents. The
  label of each piece's first token is -100: it would otherwise train the last token of one
  document to predict the first token of the next. Rows are packed per map batch of 1,000
  documents, so the last row of each batch may be shorter (the collator pads it).
"""
from __future__ import annotations

from functools import partial

import numpy as np

from harness.data import DataError, DataSplits, DataStats, logger
from harness.data.long_text import PIECE_CHARS, encode_long
from harness.data.pipeline import (ContentHash, build_splits, cached_map, digest, keep, sample_features,
                                   tokenizer_fingerprint)
from harness.data.sources import Record, Report, iter_records

MODES = ("truncate", "pack")


def build_pretrain(tokenizer, *, seed: int, path: str, split: str = "train", text_field: str = "text",
                   max_seq_length: int, min_tokens: int = 0, mode: str = "truncate", add_bos: bool = True,
                   add_eos: bool = True, eval_fraction: float = 0.0, eval_path: str = "", streaming: bool = False,
                   strict: bool = False, cache_dir: str = "", num_proc: int = 1) -> DataSplits:
    """The "pretrain" data backend: samples of long documents, see the module docstring."""
    if mode not in MODES:
        raise DataError(f"data.mode = {mode!r} is not one of {', '.join(MODES)}")
    if max_seq_length <= 0:
        raise DataError(f"data.max_seq_length = {max_seq_length} must be positive")
    prepare = partial(load_documents, tokenizer, text_field=text_field, split=split, streaming=streaming,
                      strict=strict, add_bos=add_bos, add_eos=add_eos, min_tokens=min_tokens,
                      cache_dir=cache_dir, num_proc=num_proc)
    shape = partial(_shape, mode=mode, max_seq_length=max_seq_length, cache_dir=cache_dir, num_proc=num_proc)
    stats = DataStats(source=path, mode=mode, max_seq_length=max_seq_length)
    return build_splits(prepare, shape, path=path, eval_path=eval_path, eval_fraction=eval_fraction, seed=seed,
                        stats=stats, truncates=mode == "truncate")


def load_documents(tokenizer, path: str, key: str, *, text_field: str = "text", split: str = "train",
                   streaming: bool = False, strict: bool = False, add_bos: bool = True, add_eos: bool = True,
                   min_tokens: int = 0, cache_dir: str = "", num_proc: int = 1):
    """Tokenized documents of `path` with at least `min_tokens` tokens.

    Returns (dataset with columns input_ids, length, where; the Report; the cache key).
    `key` names the setting that gave `path` in messages ("data.path", "--input").
    """
    from datasets import Dataset, Features, List, Value  # here: importing datasets takes a second

    report = Report(key, path, strict=strict, noun="documents")
    texts, wheres, content = _read_texts(path, report, text_field, split, streaming)
    if not texts:
        raise report.nothing_left()
    prefix = _special(tokenizer, "bos", add_bos)
    suffix = _special(tokenizer, "eos", add_eos)
    docs_key = digest(tokenizer_fingerprint(tokenizer), content.hexdigest(), prefix, suffix)
    docs = cached_map(
        Dataset.from_dict({"text": texts, "where": wheres}), _tokenize, stage="documents", key=docs_key,
        cache_dir=cache_dir, num_proc=num_proc, fn_kwargs={"tokenizer": tokenizer, "prefix": prefix, "suffix": suffix},
        remove_columns=["text"], desc=f"Tokenizing {key}",
        features=Features({"where": Value("string"), "input_ids": List(Value("int32")), "length": Value("int64")}),
    )
    lengths = np.asarray(docs["length"], dtype=np.int64)
    short = lengths < min_tokens
    if short.any():
        report.drop_many(f"shorter than min_tokens={min_tokens}", int(short.sum()),
                         note=f"(longest had {int(lengths[short].max())} tokens)", hint="lower data.min_tokens")
    return keep(docs, report, ~short), report, digest(docs_key, min_tokens)


def _read_texts(path: str, report: Report, text_field: str, split: str, streaming: bool):
    """(texts, wheres, content hash) of the usable documents; the others are reported."""
    texts, wheres, content = [], [], ContentHash()
    for where, record in iter_records(path, report, split=split, streaming=streaming):
        text = _text_of(record, where, text_field, report)
        if text is None:
            continue
        try:
            payload = text.encode("utf-8")
        except UnicodeEncodeError as error:  # a lone surrogate, e.g. a "\ud800" escape in JSON
            report.bad("non-UTF-8", where, f"the text holds an unpaired surrogate at character {error.start}",
                       "fix the \\u escape in the source")
            continue
        if not text.strip():
            report.drop("empty", where, "empty document")
            continue
        content.add(where, payload)
        texts.append(text)
        wheres.append(where)
    return texts, wheres, content


def _text_of(record: Record, where: str, text_field: str, report: Report) -> str | None:
    if isinstance(record, str):  # a .txt file
        return record
    if text_field not in record:
        fields = ", ".join(map(repr, record)) or "none"
        report.bad("missing field", where, f"no field {text_field!r} (fields: {fields})",
                   "set data.text_field to the field that holds the text")
        return None
    text = record[text_field]
    if not isinstance(text, str):
        report.bad("missing field", where, f"field {text_field!r} holds a {type(text).__name__}, not text",
                   "set data.text_field to the field that holds the text")
        return None
    return text


def _special(tokenizer, name: str, wanted: bool) -> list[int]:
    """[id] of the tokenizer's BOS or EOS when `wanted`, [] when not or when it has none."""
    token_id = getattr(tokenizer, f"{name}_token_id")
    if wanted and token_id is None:
        logger.warning("the tokenizer has no %s token; data.add_%s has no effect", name.upper(), name)
    return [token_id] if wanted and token_id is not None else []


def _tokenize(batch: dict, tokenizer, prefix: list[int], suffix: list[int]) -> dict:
    """Ids of the batch's documents with BOS/EOS; the very long ones piece by piece (data/long_text.py)."""
    texts = batch["text"]
    short = [i for i, text in enumerate(texts) if len(text) <= PIECE_CHARS]
    encoded = {i: encode_long(tokenizer, text) for i, text in enumerate(texts) if len(text) > PIECE_CHARS}
    if short:
        in_batch = tokenizer([texts[i] for i in short], add_special_tokens=False, verbose=False)["input_ids"]
        encoded.update(zip(short, in_batch))
    input_ids = [np.concatenate([prefix, encoded[i], suffix]).astype(np.int32) for i in range(len(texts))]
    return {"input_ids": input_ids, "length": [len(ids) for ids in input_ids]}


def _shape(records, key: str, *, mode: str, max_seq_length: int, cache_dir: str, num_proc: int):
    """Samples of the documents; the documents' ids are read as numpy arrays (4 bytes a token, not 36)."""
    return cached_map(
        records.with_format("numpy"), _pack if mode == "pack" else _truncate, stage=mode,
        key=digest(key, mode, max_seq_length),
        cache_dir=cache_dir, num_proc=num_proc, fn_kwargs={"max_seq_length": max_seq_length},
        remove_columns=records.column_names, features=sample_features(), desc=f"Shaping samples ({mode})",
    ).with_format(None)


def _truncate(batch: dict, max_seq_length: int) -> dict:
    input_ids = [ids[:max_seq_length] for ids in batch["input_ids"]]
    return {"input_ids": input_ids, "labels": input_ids, "position_ids": [list(range(len(ids))) for ids in input_ids]}


def _pack(batch: dict, max_seq_length: int) -> dict:
    """Concatenate the batch's documents into rows of max_seq_length (the last may be shorter).
    Pieces are numpy slices: a one-line book of 10M tokens stays 4-8 bytes a token, not 36."""
    rows = {"input_ids": [], "labels": [], "position_ids": []}
    row = {name: [] for name in rows}  # the pieces of the row being filled
    filled = 0
    for document in batch["input_ids"]:
        document = np.asarray(document, dtype=np.int32)
        for start in _piece_starts(len(document), max_seq_length, filled):
            piece = document[start:start + max_seq_length - filled]
            labels = piece.copy()
            labels[0] = -100  # no target for a piece's first token: see the module docstring
            row["input_ids"].append(piece)
            row["labels"].append(labels)
            row["position_ids"].append(np.arange(len(piece), dtype=np.int32))
            filled += len(piece)
            if filled == max_seq_length:
                _append_row(rows, row)
                filled = 0
    if filled:
        _append_row(rows, row)
    return rows


def _piece_starts(length: int, max_seq_length: int, filled: int) -> list[int]:
    """Where a document's pieces start when the current row already holds `filled` tokens."""
    first = min(length, max_seq_length - filled)
    return [0, *range(first, length, max_seq_length)] if length else []


def _append_row(rows: dict, row: dict) -> None:
    for name, pieces in row.items():
        rows[name].append(np.concatenate(pieces))
        pieces.clear()
