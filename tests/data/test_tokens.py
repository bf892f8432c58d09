"""The .bin token format (uint16/uint32 + sidecar) and the "tokens" data backend."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from harness.data import DataError
from harness.data.tokens import build_tokens, read_tokens, write_tokens

TEXTS = ["First document.", "Second, a bit longer: café.", "3"]


def test_round_trip_matches_the_tokenizer(byte_tokenizer, tmp_path):
    documents = [byte_tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    info = write_tokens(tmp_path / "out.bin", documents, vocab_size=len(byte_tokenizer),
                        tokenizer_name="builtin:bytes", eos_id=byte_tokenizer.eos_token_id)
    expected = sum((ids + [byte_tokenizer.eos_token_id] for ids in documents), [])
    assert info == {"dtype": "uint16", "vocab_size": 260, "tokenizer": "builtin:bytes",
                    "num_tokens": sum(len(t.encode("utf-8")) + 1 for t in TEXTS), "num_documents": 3}
    assert json.loads((tmp_path / "out.bin.json").read_text()) == info
    tokens = read_tokens(tmp_path / "out.bin")
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    assert (tmp_path / "out.bin").stat().st_size == 2 * len(expected)
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_uint32_when_the_vocabulary_exceeds_65535(tmp_path):
    documents = [np.array([0, 65535, 65536, 99999]), [7]]
    info = write_tokens(tmp_path / "big.bin", documents, vocab_size=100_000, tokenizer_name="big")
    assert info["dtype"] == "uint32" and info["num_tokens"] == 5
    tokens = read_tokens(tmp_path / "big.bin")
    assert tokens.dtype == np.uint32 and tokens.tolist() == [0, 65535, 65536, 99999, 7]
    with pytest.raises(DataError, match="document 0 holds token id 100000, outside the vocabulary of 100000 ids"):
        write_tokens(tmp_path / "bad.bin", [[100_000]], vocab_size=100_000, tokenizer_name="big")
    assert not (tmp_path / "bad.bin").exists()


def test_bad_size_and_bad_sidecar_are_errors(tmp_path):
    write_tokens(tmp_path / "t.bin", [[1, 2, 3]], vocab_size=100_000, tokenizer_name="big")
    (tmp_path / "t.bin").write_bytes((tmp_path / "t.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match=r"10 bytes, not a multiple of 4 \(uint32\)"):
        read_tokens(tmp_path / "t.bin")
    (tmp_path / "t.bin").write_bytes(np.arange(2, dtype=np.uint32).tobytes())
    with pytest.raises(DataError, match="holds 2 tokens but .*t.bin.json declares 3"):
        read_tokens(tmp_path / "t.bin")
    (tmp_path / "t.bin.json").write_text('{"dtype": "int8"}')
    with pytest.raises(DataError, match='"dtype" is \'int8\'; it must be "uint16" or "uint32"'):
        read_tokens(tmp_path / "t.bin")


def test_no_sidecar_reads_uint16_with_a_warning(tmp_path, caplog):
    (tmp_path / "pg19.bin").write_bytes(np.array([5, 6, 7], dtype=np.uint16).tobytes())
    assert read_tokens(tmp_path / "pg19.bin").tolist() == [5, 6, 7]
    assert any("has no sidecar pg19.bin.json; reading it as uint16" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="3 bytes, not a multiple of 2"):
        read_tokens(tmp_path / "odd.bin")


def test_tokens_backend_chunks(byte_tokenizer, tmp_path):
    write_tokens(tmp_path / "t.bin", [list(range(4, 29))], vocab_size=260, tokenizer_name="builtin:bytes")  # 25 ids
    splits = build_tokens(byte_tokenizer, seed=0, path=str(tmp_path / "t.bin"), max_seq_length=8)
    items = [splits.train[i] for i in range(len(splits.train))]
    assert [item["input_ids"] for item in items] == [list(range(4, 12)), list(range(12, 20)), list(range(20, 28))]
    assert all(item["labels"] == item["input_ids"] and item["position_ids"] == list(range(8)) for item in items)
    assert splits.eval is None and splits.stats.lengths == {"train": [8, 8, 8]}  # the 1-token tail is dropped
    held = build_tokens(byte_tokenizer, seed=0, path=str(tmp_path / "t.bin"), max_seq_length=8, eval_fraction=0.3)
    assert len(held.train) == 2 and len(held.eval) == 1


def test_tokens_backend_rejects_another_tokenizers_file(byte_tokenizer, tmp_path):
    write_tokens(tmp_path / "t.bin", [[1, 300, 2]], vocab_size=32000, tokenizer_name="llama")
    with pytest.raises(DataError, match="holds token id 300, but the tokenizer has 260 ids"):
        build_tokens(byte_tokenizer, seed=0, path=str(tmp_path / "t.bin"), max_seq_length=8)
    with pytest.raises(DataError, match=r"data.path = '.*missing.bin': token file .* does not exist"):
        build_tokens(byte_tokenizer, seed=0, path=str(tmp_path / "missing.bin"), max_seq_length=8)


def test_a_write_error_is_one_clear_error_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output's folder should be")
    with pytest.raises(DataError, match="not-a-folder/out.bin: cannot write it: .*nothing was written"):
        write_tokens(blocker / "out.bin", [[1, 2, 3]], vocab_size=260, tokenizer_name="builtin:bytes")
    full = tmp_path / "full.bin"

    def documents():  # the disk fills up halfway through
        yield [1, 2, 3]
        raise OSError(28, "No space left on device")

    with pytest.raises(DataError, match="full.bin: cannot write it: No space left on device"):
        write_tokens(full, documents(), vocab_size=260, tokenizer_name="builtin:bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]  # no partial file, no sidecar
