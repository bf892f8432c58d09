"""Steps shared by the pretrain and SFT backends: the map cache, the held-out split, stats.

Cache: every `datasets.map` step writes ``{cache_dir}/{stage}-{key}.arrow`` (cache_dir ""
means ~/.cache/harness/datasets) and reuses it when the key matches. The key is a hash of
the tokenizer (its full definition: vocabulary, merges, normalizer, added and special tokens,
chat template), of the settings the step uses, and of the content of the records read, so a
changed tokenizer, setting or data file gives a new key. The folder can be deleted any time.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from harness.data import DataError, DataSplits, DataStats, logger
from harness.data.sources import Report
from harness.quiet import progress_bars_if

DEFAULT_CACHE_DIR = "~/.cache/harness/datasets"


def digest(*parts) -> str:
    """A short stable hash of JSON-able parts (anything else by its str)."""
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str:
    if getattr(tokenizer, "is_fast", False):
        definition = tokenizer.backend_tokenizer.to_str()  # vocab, merges, normalizer, added tokens
    else:
        definition = sorted(tokenizer.get_vocab().items())
    specials = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token)
    return digest(type(tokenizer).__name__, definition, specials, tokenizer.chat_template)


class ContentHash:
    """Running hash of the records read, for the cache key."""

    def __init__(self):
        self._hash = hashlib.sha256()

    def add(self, where: str, payload: bytes) -> None:
        self._hash.update(where.encode() + b"\0" + payload + b"\0")

    def hexdigest(self) -> str:
        return self._hash.hexdigest()[:24]


def cached_map(dataset, function: Callable, *, stage: str, key: str, cache_dir: str, num_proc: int = 1,
               fn_kwargs: dict | None = None, remove_columns: list[str] | None = None, features=None,
               batch_size: int = 1000, desc: str = ""):
    """`dataset.map(function, batched=True)` written to, or reused from, the cache folder."""
    folder = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    with progress_bars_if(len(dataset) > batch_size):  # over one batch a bar only jumps from 0 to 100%
        return dataset.map(
            function, batched=True, batch_size=batch_size, fn_kwargs=fn_kwargs, remove_columns=remove_columns,
            features=features, num_proc=num_proc if num_proc > 1 else None,
            cache_file_name=str(folder / f"{stage}-{key}.arrow"), new_fingerprint=key, desc=desc or stage,
        )


def sample_features():
    """Arrow types of a training sample: int32 lists (token ids, -100 and positions all fit)."""
    from datasets import Features, List, Value

    return Features({name: List(Value("int32")) for name in ("input_ids", "labels", "position_ids")})


def check_eval_settings(eval_fraction: float, eval_path: str) -> None:
    if not 0 <= eval_fraction < 1:
        raise DataError(f"data.eval_fraction = {eval_fraction} must be in [0, 1)")
    if eval_fraction and eval_path:
        raise DataError(f"data.eval_fraction = {eval_fraction} and data.eval_path = {eval_path!r} are both set; "
                        f"keep one of them")


def holdout(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) indices: a seeded random `fraction` of `count` records held out (at least 1)."""
    if not fraction:
        return np.arange(count), np.arange(0)
    n_eval = max(1, round(count * fraction))
    if n_eval >= count:
        raise DataError(f"data.eval_fraction = {fraction} would hold out all {count} records that are left; "
                        f"lower it or give a separate data.eval_path")
    chosen = np.random.default_rng(seed).permutation(count)
    return np.sort(chosen[n_eval:]), np.sort(chosen[:n_eval])


def keep(docs, report: Report, mask: np.ndarray):
    """The records of `docs` where `mask` is true; the error naming every filter if none is."""
    if not mask.any():
        raise report.nothing_left()
    report.log_summary(int(mask.sum()))
    return docs.select(np.flatnonzero(mask), keep_in_memory=True)


def build_splits(prepare: Callable, shape: Callable, *, path: str, eval_path: str, eval_fraction: float,
                 seed: int, stats: DataStats, truncates: bool) -> DataSplits:
    """Prepare records (read, tokenize, filter), hold out eval records, shape both into samples.

    `prepare(path, key)` gives (records, report, cache key): a datasets.Dataset with a
    "length" column (tokens per record); `shape(records, cache key)` turns records into
    samples. `truncates`: whether records longer than max_seq_length lose their tail.
    """
    check_eval_settings(eval_fraction, eval_path)
    docs, report, docs_key = prepare(path, "data.path")
    stats.records, stats.skipped = report.records, dict(report.skipped)
    if eval_path:
        eval_docs, _, eval_key = prepare(eval_path, "data.eval_path")
        splits = {"train": (docs, docs_key), "eval": (eval_docs, eval_key)}
    else:
        splits = _holdout_splits(docs, docs_key, eval_fraction, seed)
    samples = {}
    for split, (records, key) in splits.items():
        source = ("data.eval_path", eval_path) if split == "eval" and eval_path else ("data.path", path)
        lengths = np.asarray(records["length"], dtype=np.int64)
        stats.lengths[split] = lengths.tolist()
        stats.truncated[split] = int((lengths > stats.max_seq_length).sum()) if truncates else 0
        samples[split] = shape(records, key)
        stats.samples[split] = len(samples[split])
        logger.info("%s = %r: %s split, %d records -> %d samples", *source, split, len(records), stats.samples[split])
        _check_size(source, split, int(lengths.sum()), len(samples[split]), stats.max_seq_length)
    return DataSplits(train=samples["train"], eval=samples.get("eval"), stats=stats)


def _check_size(source: tuple[str, str], split: str, tokens: int, count: int, max_seq_length: int) -> None:
    """A split without a sample is refused; less text than one sequence is said, with the numbers: a
    training split trains on one padded sample, a held-out one does not read the target length."""
    key, path = source
    if tokens <= count:  # no sample, or one token each: nothing to predict
        raise DataError(f"{key} = {path!r}: the {split} split holds {tokens} tokens in {count} samples: no sample "
                        f"has a next token to predict. Give it more text")
    if max_seq_length and tokens < max_seq_length:
        effect = ("it trains on one padded sample. Add text or lower data.max_seq_length" if split == "train" else
                  "its perplexity is read at that length, not at the target. Give longer held-out text")
        logger.warning("%s = %r: the %s split holds %d tokens, fewer than one sequence of data.max_seq_length = %d: "
                       "%s", key, path, split, tokens, max_seq_length, effect)


def _holdout_splits(docs, key: str, fraction: float, seed: int) -> dict:
    """{split: (records, cache key)} for train and, if any are held out, eval."""
    indices = dict(zip(("train", "eval"), holdout(len(docs), fraction, seed)))
    return {split: (docs.select(index, keep_in_memory=True), digest(key, split, fraction, seed))
            for split, index in indices.items() if len(index)}
