"""Pretraining data: truncation and min_tokens on a real book, packing, held-out split, cache."""
from __future__ import annotations

import json

import datasets
import pytest
import torch

from harness.data import DataError
from harness.data.pretrain import build_pretrain

datasets.disable_progress_bars()

TEXTS = ["The first document.", "A second, rather longer document about rivers and fish.", "Third.",
         "Fourth document, of middling length."]


def corpus(tmp_path, texts=TEXTS):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def pretrain(tokenizer, path, tmp_path, **settings):
    settings = {"cache_dir": str(tmp_path / ".cache"), "seed": 0, **settings}
    return build_pretrain(tokenizer, path=str(path), **settings)


def test_truncate_and_min_tokens_on_a_book(byte_tokenizer, book_path, tmp_path):
    book = book_path.read_text(encoding="utf-8")
    tokens = len(book.encode("utf-8")) + 2  # one byte a token, plus BOS and EOS
    splits = pretrain(byte_tokenizer, book_path, tmp_path, max_seq_length=4096, min_tokens=4096)
    (item,) = splits.train
    assert item["input_ids"][0] == byte_tokenizer.bos_token_id
    assert byte_tokenizer.decode(item["input_ids"][1:]) == book.encode("utf-8")[:4095].decode("utf-8", "ignore")
    assert item["labels"] == item["input_ids"] and item["position_ids"] == list(range(4096))
    assert splits.stats.lengths == {"train": [tokens]} and splits.stats.truncated == {"train": 1}
    with pytest.raises(DataError, match=rf"shorter than min_tokens={tokens + 1} \(longest had {tokens} tokens\); "
                                        rf"lower data.min_tokens"):
        pretrain(byte_tokenizer, book_path, tmp_path, max_seq_length=4096, min_tokens=tokens + 1)


def test_bos_and_eos_settings(byte_tokenizer, tmp_path):
    path = corpus(tmp_path, ["abc"])
    ids = lambda **flags: pretrain(byte_tokenizer, path, tmp_path, max_seq_length=64, **flags).train[0]["input_ids"]  # noqa: E731
    abc = byte_tokenizer("abc", add_special_tokens=False)["input_ids"]
    bos, eos = byte_tokenizer.bos_token_id, byte_tokenizer.eos_token_id
    assert ids() == [bos] + abc + [eos]
    assert ids(add_bos=False) == abc + [eos]
    assert ids(add_eos=False) == [bos] + abc


def test_pack_boundaries(byte_tokenizer, tmp_path):
    splits = pretrain(byte_tokenizer, corpus(tmp_path), tmp_path, max_seq_length=32, mode="pack")
    documents = [[0] + byte_tokenizer(t, add_special_tokens=False)["input_ids"] + [1] for t in TEXTS]
    rows = list(splits.train)
    assert [len(row["input_ids"]) for row in rows[:-1]] == [32] * (len(rows) - 1)
    assert sum((row["input_ids"] for row in rows), []) == sum(documents, [])  # nothing lost, order kept
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert starts[0] == 0
        for start, end in zip(starts, starts[1:] + [len(row["input_ids"])]):
            assert row["position_ids"][start:end] == list(range(end - start))
            assert row["labels"][start] == -100
            assert row["labels"][start + 1:end] == row["input_ids"][start + 1:end]
    # A document start inside a row is BOS; each row's first piece may continue a document.
    assert all(row["input_ids"][s] == 0 for row in rows for s, p in enumerate(row["position_ids"]) if p == 0 and s)
    assert splits.stats.truncated == {"train": 0} and splits.stats.samples == {"train": len(rows)}


def test_packed_attention_never_crosses_documents(byte_tokenizer, tiny_config, tmp_path):
    """Logits of a packed row (no attention_mask) equal those of each document run alone.

    transformers 5 finds packed sequences from position_ids restarting at 0 when it gets no
    attention_mask and no cache (masking_utils.find_packed_sequence_indices), hence use_cache=False.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config, attn_implementation="sdpa").eval()
    (row,) = pretrain(byte_tokenizer, corpus(tmp_path), tmp_path, max_seq_length=256, mode="pack").train
    ids, positions = torch.tensor([row["input_ids"]]), torch.tensor([row["position_ids"]])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        crossing = model(input_ids=ids, use_cache=False).logits[0]  # one sequence: attends across documents
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for start, end in zip(starts, starts[1:]):
            alone = model(input_ids=ids[:, start:end], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-4, atol=1e-4)
    assert len(starts) - 1 == len(TEXTS)
    assert not torch.allclose(packed[starts[1]:], crossing[starts[1]:], atol=1e-3)  # the test can tell


def test_eval_fraction_is_a_seeded_document_split(byte_tokenizer, tmp_path):
    texts = [f"document number {i}" for i in range(20)]
    path = corpus(tmp_path, texts)

    def split(seed):
        splits = pretrain(byte_tokenizer, path, tmp_path, max_seq_length=64, eval_fraction=0.25, seed=seed)
        decode = lambda items: sorted(byte_tokenizer.decode(item["input_ids"][1:-1]) for item in items)  # noqa: E731
        return decode(splits.train), decode(splits.eval)

    train, held_out = split(seed=1)
    assert len(held_out) == 5 and sorted(train + held_out) == sorted(texts)
    assert split(seed=1) == (train, held_out)
    assert split(seed=2)[1] != held_out


def test_eval_path(byte_tokenizer, tmp_path):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    splits = pretrain(byte_tokenizer, corpus(tmp_path), tmp_path, max_seq_length=64,
                      eval_path=str(corpus(eval_dir, ["held out"])))
    assert len(splits.train) == len(TEXTS) and len(splits.eval) == 1
    with pytest.raises(DataError, match="keep one of them"):
        pretrain(byte_tokenizer, corpus(tmp_path), tmp_path, max_seq_length=64, eval_path="x", eval_fraction=0.1)


def test_tokenization_cache_is_reused_and_keyed_by_settings(byte_tokenizer, tmp_path):
    path = corpus(tmp_path)
    first = pretrain(byte_tokenizer, path, tmp_path, max_seq_length=16)
    files = sorted((tmp_path / ".cache").iterdir())
    assert any(f.name.startswith("documents-") for f in files)
    again = pretrain(byte_tokenizer, path, tmp_path, max_seq_length=16)
    assert sorted((tmp_path / ".cache").iterdir()) == files
    assert list(again.train) == list(first.train)
    pretrain(byte_tokenizer, path, tmp_path, max_seq_length=16, add_eos=False)
    assert len([f for f in (tmp_path / ".cache").iterdir() if f.name.startswith("documents-")]) == 2


def test_less_text_than_one_sequence_is_warned_with_the_numbers(byte_tokenizer, tmp_path, caplog):
    tokens = sum(len(t.encode("utf-8")) + 2 for t in TEXTS)  # bytes + BOS + EOS per document
    with caplog.at_level("WARNING", logger="harness"):
        splits = pretrain(byte_tokenizer, corpus(tmp_path), tmp_path, max_seq_length=4096, mode="pack")
    assert len(splits.train) == 1
    assert f"holds {tokens} tokens, fewer than one sequence of data.max_seq_length = 4096" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="harness"):
        pretrain(byte_tokenizer, corpus(tmp_path), tmp_path, max_seq_length=32, mode="pack")
    assert "fewer than one sequence" not in caplog.text
