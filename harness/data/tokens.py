"""Token files: the flat ``.bin`` format of the LongLoRA/LongQLoRA evaluation sets.

A ``.bin`` file is the token ids of all documents, concatenated, as a flat array of uint16
(uint32 when the vocabulary exceeds 65,535 ids), with no header, read through np.memmap.
A sidecar ``OUT.bin.json`` declares how to read it:

    {"dtype": "uint16", "vocab_size": 32000, "tokenizer": "...", "num_tokens": N, "num_documents": D}

LongLoRA's own PG19 and proof-pile files come without a sidecar; such a file is read as
uint16, with a warning. The "tokens" data backend trains on consecutive max_seq_length chunks
of one file (document boundaries are not recorded, so a chunk may span two documents).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from harness import atomic
from harness.data import DataError, DataSplits, DataStats, logger
from harness.data.pipeline import check_eval_settings, holdout

UINT16_MAX_VOCAB = 65535  # larger vocabularies are written as uint32


def sidecar_path(path: str | Path) -> Path:
    return Path(f"{path}.json")


def write_tokens(path: str | Path, documents: Iterable[Iterable[int]], vocab_size: int, tokenizer_name: str,
                 eos_id: int | None = None) -> dict:
    """Write documents' token ids to `path` (+ sidecar), each followed by `eos_id` if given.

    Returns the sidecar's content. The files appear only once complete (written to a
    temporary name, then renamed), so an interrupted run leaves no half-written .bin.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _write_tokens(path, documents, vocab_size, tokenizer_name, eos_id)
    except OSError as error:
        raise DataError(f"{path}: cannot write it: {error.strerror or error}. Free disk space or choose another "
                        f"output path; nothing was written") from None


def _write_tokens(path: Path, documents, vocab_size: int, tokenizer_name: str, eos_id: int | None) -> dict:
    dtype = np.dtype(np.uint32 if vocab_size > UINT16_MAX_VOCAB else np.uint16)
    num_tokens = num_documents = 0
    with atomic.atomic_file(path) as partial_path, open(partial_path, "wb") as handle:
        for document in documents:
            ids = np.asarray(document, dtype=np.int64)
            if eos_id is not None:
                ids = np.append(ids, eos_id)
            outside = ids[(ids < 0) | (ids >= vocab_size)]
            if outside.size:
                raise DataError(f"document {num_documents} holds token id {int(outside[0])}, outside the "
                                f"vocabulary of {vocab_size} ids ({tokenizer_name})")
            handle.write(ids.astype(dtype).tobytes())
            num_tokens += ids.size
            num_documents += 1
        info = {"dtype": dtype.name, "vocab_size": vocab_size, "tokenizer": tokenizer_name,
                "num_tokens": num_tokens, "num_documents": num_documents}
        atomic.write_text(sidecar_path(path), json.dumps(info, indent=2) + "\n")
    return info


def read_tokens(path: str | Path) -> np.memmap:
    """The token ids of a .bin file, memory-mapped read-only, in the dtype its sidecar declares."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token file {str(path)!r} does not exist")
    info = read_sidecar(path)
    dtype = np.dtype(info["dtype"])
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"{path} is {size} bytes, not a multiple of {dtype.itemsize} ({dtype.name}): the file is "
                        f"truncated or its dtype is wrong (see {sidecar_path(path)})")
    if size == 0:
        raise DataError(f"{path} holds no tokens")
    if "num_tokens" in info and info["num_tokens"] != size // dtype.itemsize:
        raise DataError(f"{path} holds {size // dtype.itemsize} tokens but {sidecar_path(path)} declares "
                        f"{info['num_tokens']}: the file is incomplete; write it again")
    return np.memmap(path, dtype=dtype, mode="r")


def read_sidecar(path: Path) -> dict:
    """The sidecar of `path`, or {"dtype": "uint16"} with a warning when there is none."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        logger.warning("%s has no sidecar %s; reading it as uint16 token ids (LongLoRA's format). Files of a "
                       "vocabulary over 65,535 ids need a sidecar saying {\"dtype\": \"uint32\"}", path, sidecar.name)
        return {"dtype": "uint16"}
    try:
        info = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{sidecar}: not valid JSON ({error}); write the token file again") from error
    if info.get("dtype") not in ("uint16", "uint32"):
        raise DataError(f"{sidecar}: \"dtype\" is {info.get('dtype')!r}; it must be \"uint16\" or \"uint32\"")
    return info


class TokenChunks:
    """Map-style dataset of the `starts[i]`..+max_seq_length chunks of a token array."""

    def __init__(self, tokens: np.ndarray, max_seq_length: int, starts: np.ndarray):
        self.tokens, self.max_seq_length, self.starts = tokens, max_seq_length, starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict:
        start = int(self.starts[index])
        ids = self.tokens[start:start + self.max_seq_length].astype(np.int64).tolist()
        return {"input_ids": ids, "labels": ids, "position_ids": list(range(len(ids)))}


def build_tokens(tokenizer, *, seed: int, path: str, max_seq_length: int, eval_fraction: float = 0.0,
                 eval_path: str = "") -> DataSplits:
    """The "tokens" data backend: consecutive max_seq_length chunks of a .bin file.

    The last chunk may be shorter (it is dropped below 2 tokens: nothing to predict).
    eval_fraction holds out a seeded random share of the chunks; eval_path names another .bin.
    """
    if max_seq_length <= 0:
        raise DataError(f"data.max_seq_length = {max_seq_length} must be positive")
    check_eval_settings(eval_fraction, eval_path)
    tokens = _checked_tokens(path, "data.path", tokenizer)
    starts = _chunk_starts(len(tokens), max_seq_length)
    if eval_path:
        eval_tokens = _checked_tokens(eval_path, "data.eval_path", tokenizer)
        train, evaluation = TokenChunks(tokens, max_seq_length, starts), TokenChunks(
            eval_tokens, max_seq_length, _chunk_starts(len(eval_tokens), max_seq_length))
    else:
        train_index, eval_index = holdout(len(starts), eval_fraction, seed)
        train = TokenChunks(tokens, max_seq_length, starts[train_index])
        evaluation = TokenChunks(tokens, max_seq_length, starts[eval_index]) if len(eval_index) else None
    stats = DataStats(source=path, mode="tokens", max_seq_length=max_seq_length, records=len(starts))
    for split, chunks in (("train", train), ("eval", evaluation)):
        if chunks is not None:
            stats.lengths[split] = np.minimum(max_seq_length, len(chunks.tokens) - chunks.starts).tolist()
            stats.truncated[split] = 0
            stats.samples[split] = len(chunks)
    return DataSplits(train=train, eval=evaluation, stats=stats)


def _checked_tokens(path: str, key: str, tokenizer) -> np.memmap:
    """The tokens of `path`, checked to be ids of `tokenizer`."""
    try:
        tokens = read_tokens(path)
    except DataError as error:
        raise DataError(f"{key} = {path!r}: {error}") from error
    if len(tokens) < 2:
        raise DataError(f"{key} = {path!r} holds {len(tokens)} token, too few for one sample")
    largest = int(tokens.max())
    if largest >= len(tokenizer):
        raise DataError(f"{key} = {path!r} holds token id {largest}, but the tokenizer has {len(tokenizer)} ids: "
                        f"the file was written for another tokenizer (or with another dtype); write it again "
                        f"with tools/prepare_data.py --tokenizer for this model")
    return tokens


def _chunk_starts(num_tokens: int, max_seq_length: int) -> np.ndarray:
    """Chunk offsets; a last chunk under 2 tokens is dropped (num_tokens >= 2 keeps one)."""
    starts = np.arange(0, num_tokens, max_seq_length)
    return starts[:-1] if num_tokens - starts[-1] < 2 else starts
