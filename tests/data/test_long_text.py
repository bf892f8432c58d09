"""Long texts tokenized piece by piece give the whole text's tokens, for every kind of tokenizer.

Three real tokenizers, trained here on a book with the `tokenizers` library: byte-level BPE with
GPT-2's pre-tokenizer (LLaMA-3, Qwen, SmolLM2: cuts before a space hold), SentencePiece-style
that prepends "▁" to every text (LLaMA-2's: the space at a cut must be dropped), and a BPE
without pre-tokenizer whose merges cross spaces (no cut holds: the text is tokenized whole).
The reference is always the tokenizer on the whole text.
"""
from __future__ import annotations

import logging

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from harness.data import long_text, pretrain


@pytest.fixture
def book(book_path) -> str:
    return " ".join(book_path.read_text(encoding="utf-8").split())[:30_000]  # one line, single spaces


def trained(book: str, pre_tokenizer, decoder) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    if pre_tokenizer is not None:
        backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoder
    initial = pre_tokenizers.ByteLevel.alphabet() if isinstance(decoder, decoders.ByteLevel) else []
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"], initial_alphabet=initial)
    backend.train_from_iterator([book], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def byte_level(book):
    return trained(book, pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())


def prepending(book):
    """LLaMA-2's fast tokenizer: "▁" prepended to the text and put for every space, pieces start at "▁"."""
    tokenizer = trained(book, pre_tokenizers.Split("▁", behavior="merged_with_next"), decoders.Metaspace())
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                                   normalizers.Replace(" ", "▁")])
    return tokenizer


def merging_across_spaces(book):
    return trained(book, None, decoders.ByteLevel())


def whole(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("make, skip", [(byte_level, 0), (prepending, 1), (merging_across_spaces, None)])
def test_pieces_give_the_whole_texts_tokens(book, make, skip, caplog):
    tokenizer = make(book)
    cuts = long_text._cuts(book, 2000)
    assert len(cuts) >= 10 and all(book[cut] == " " for cut in cuts)
    assert long_text._checked_skip(tokenizer, book, cuts, 2000) == skip
    with caplog.at_level(logging.WARNING, logger="harness.data"):
        assert long_text.encode_long(tokenizer, book, piece_chars=2000).tolist() == whole(tokenizer, book)
    assert ("tokenizing a text of 30,000 characters whole" in caplog.text) == (skip is None)


def test_a_text_without_safe_spaces_is_one_piece(book):
    assert long_text._cuts("x" * 5000, 1000) == []
    assert long_text._cuts("a  b" * 2000, 1000) == []  # double spaces only: never cut inside a run of spaces


def test_the_pretrain_tokenizer_keeps_batch_order_and_special_tokens(book, monkeypatch):
    """Long documents (piece by piece) and short ones (one batch call) come back in their order."""
    tokenizer = byte_level(book)
    monkeypatch.setattr(pretrain, "PIECE_CHARS", 5000)
    texts = ["A short one.", book, "Another short one.", book[:12_000]]
    got = pretrain._tokenize({"text": texts}, tokenizer, prefix=[7], suffix=[8])
    assert [ids.tolist() for ids in got["input_ids"]] == [[7, *whole(tokenizer, text), 8] for text in texts]
    assert got["length"] == [len(ids) for ids in got["input_ids"]]
