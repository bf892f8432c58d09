"""Reading data.path: file kinds, folders, globs, hub ids, and every kind of bad input."""
from __future__ import annotations

import json
import logging

import datasets
import pytest

from harness.data import DataError
from harness.data.pretrain import build_pretrain

datasets.disable_progress_bars()


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pretrain(tokenizer, path, tmp_path, **settings):
    settings = {"max_seq_length": 64, "cache_dir": str(tmp_path / ".cache"), **settings}  # hidden: not data
    return build_pretrain(tokenizer, seed=0, path=str(path), **settings)


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "harness.data" and r.levelno == logging.WARNING]


def test_file_kinds_folder_and_glob(byte_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a text file is one document\nwith two lines")
    write_lines(folder / "b.jsonl", [json.dumps({"body": "jsonl one"}), json.dumps({"body": "jsonl two"})])
    (folder / "sub" / "c.json").write_text(json.dumps([{"body": "json one"}, {"body": "json two"}]))
    pq.write_table(pa.table({"body": ["parquet one"]}), folder / "sub" / "d.parquet")
    splits = pretrain(byte_tokenizer, folder, tmp_path, text_field="body", add_bos=False, add_eos=False)
    texts = [byte_tokenizer.decode(item["input_ids"]) for item in splits.train]
    assert texts == ["a text file is one document\nwith two lines", "jsonl one", "jsonl two",
                     "json one", "json two", "parquet one"]
    globbed = pretrain(byte_tokenizer, tmp_path / "docs" / "**" / "*.json*", tmp_path, text_field="body")
    assert globbed.stats.records == 4  # b.jsonl and sub/c.json


def test_json_lines_in_a_json_file(byte_tokenizer, tmp_path):
    path = write_lines(tmp_path / "lines.json", [json.dumps({"text": "one"}), json.dumps({"text": "two"})])
    assert len(pretrain(byte_tokenizer, path, tmp_path).train) == 2


def test_other_files_in_a_folder_are_named(byte_tokenizer, tmp_path, caplog):
    (tmp_path / "book.txt").write_text("a book")
    (tmp_path / "notes.csv").write_text("a,b")
    pretrain(byte_tokenizer, tmp_path, tmp_path)
    assert any("ignoring 1 files" in m and "notes.csv" in m for m in warnings(caplog))


def test_malformed_line_warns_with_file_line_and_is_counted(byte_tokenizer, tmp_path, caplog):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "good one"}', '{"text": "broken', '{"text": "good two"}'])
    splits = pretrain(byte_tokenizer, path, tmp_path)
    assert len(splits.train) == 2
    assert splits.stats.skipped == {"malformed JSON": 1}
    messages = warnings(caplog)
    assert any(m.startswith(f"{path}:2: malformed JSON") for m in messages)
    assert f"data.path = '{path}': kept 2 of 3 documents; skipped 1 malformed JSON" in "\n".join(messages)


def test_strict_fails_on_a_malformed_line(byte_tokenizer, tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "good"}', "[1, 2]"])
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object.*data.strict = false"):
        pretrain(byte_tokenizer, path, tmp_path, strict=True)


def test_missing_field_is_reported(byte_tokenizer, tmp_path, caplog):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "good"}', '{"content": "no text field"}', '{"text": 7}'])
    splits = pretrain(byte_tokenizer, path, tmp_path)
    assert splits.stats.skipped == {"missing field": 2}
    messages = warnings(caplog)
    assert any(m.startswith(f"{path}:2: no field 'text' (fields: 'content')") and "data.text_field" in m
               for m in messages)
    assert any(m.startswith(f"{path}:3: field 'text' holds a int, not text") for m in messages)


def test_non_utf8_text_is_reported(byte_tokenizer, tmp_path, caplog):
    (tmp_path / "latin1.txt").write_bytes("first line\ncaf\u00e9\n".encode("latin-1"))
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": "bad \\ud800 escape"}\n')
    splits = pretrain(byte_tokenizer, tmp_path, tmp_path)
    assert splits.stats.skipped == {"non-UTF-8": 3}
    messages = warnings(caplog)
    assert any(m.startswith(f"{tmp_path / 'latin1.txt'}:2: byte 0xe9 at column 4 is not UTF-8") for m in messages)
    assert any(m.startswith(f"{tmp_path / 'd.jsonl'}:2: byte 0xe9") and "iconv" in m for m in messages)
    assert any(m.startswith(f"{tmp_path / 'd.jsonl'}:3: the text holds an unpaired surrogate") for m in messages)


def test_empty_documents_are_reported(byte_tokenizer, tmp_path, caplog):
    (tmp_path / "empty.txt").write_text("  \n")
    write_lines(tmp_path / "d.jsonl", ['{"text": ""}', '{"text": "kept"}'])
    splits = pretrain(byte_tokenizer, tmp_path, tmp_path)
    assert splits.stats.skipped == {"empty": 2}
    assert {f"{tmp_path / 'd.jsonl'}:1: empty document; skipped",
            f"{tmp_path / 'empty.txt'}:1: empty document; skipped"} <= set(warnings(caplog))


def test_nothing_left_names_every_filter(byte_tokenizer, tmp_path):
    lines = ['{"text": ""}'] * 3 + ['{"text": "%s"}' % ("x" * n) for n in range(1, 10)]
    path = write_lines(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError) as error:
        pretrain(byte_tokenizer, path, tmp_path, min_tokens=4096)
    assert str(error.value) == (f"0 of 12 documents left in data.path = '{path}': 3 empty, 9 shorter than "
                                f"min_tokens=4096 (longest had 11 tokens); lower data.min_tokens")


def test_missing_path_names_the_setting(byte_tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"data\.path = '.*nowhere\.jsonl' does not exist"):
        pretrain(byte_tokenizer, tmp_path / "nowhere.jsonl", tmp_path)
    with pytest.raises(DataError, match=r"data\.path = '.*\*\.jsonl' matches no"):
        pretrain(byte_tokenizer, tmp_path / "*.jsonl", tmp_path)
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        pretrain(byte_tokenizer, tmp_path / "table.csv", tmp_path)


def test_hub_dataset_rows_and_errors(byte_tokenizer, tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        if name == "owner/missing":
            raise FileNotFoundError("Couldn't find a dataset script or data file")
        return iter([{"text": "hub row one"}, {"content": "no text"}, {"text": "hub row two"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = pretrain(byte_tokenizer, "hub:owner/books", tmp_path, split="validation", streaming=True)
    assert calls == [("owner/books", "validation", True)]
    assert [byte_tokenizer.decode(item["input_ids"][1:-1]) for item in splits.train] == ["hub row one", "hub row two"]
    assert splits.stats.skipped == {"missing field": 1}
    with pytest.raises(DataError, match=r"data\.path = 'hub:owner/missing': could not load hub dataset "
                                        r"'owner/missing' \(split 'train'\): Couldn't find"):
        pretrain(byte_tokenizer, "hub:owner/missing", tmp_path)


def test_paths_that_are_not_data_say_what_they_are(byte_tokenizer, tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for path in (tmp_path / "pipe", "/dev/zero"):
        with pytest.raises(DataError, match=r"is not a regular file or a folder \(a FIFO, a device or a socket\)"):
            pretrain(byte_tokenizer, path, tmp_path)
    with pytest.raises(DataError, match=r"is a symbolic link that leads nowhere \(a loop, or a missing target\)"):
        pretrain(byte_tokenizer, tmp_path / "loop", tmp_path)


def test_an_empty_parquet_file_is_one_clear_error(byte_tokenizer, tmp_path):
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.parquet: not a readable parquet file \(0 bytes: .*Re-export it"):
        pretrain(byte_tokenizer, tmp_path / "empty.parquet", tmp_path)
