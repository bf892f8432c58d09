"""tools/prepare_data.py (harness.cli.prepare_data) end to end, in a subprocess as a user runs it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from harness.data.tokens import read_tokens
from harness.tokenizer import byte_tokenizer
from tests.conftest import ROOT


def prepare(*args):
    env = {**os.environ, "COLUMNS": "250"}  # rich wraps at the terminal width
    return subprocess.run([sys.executable, "tools/prepare_data.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_text_and_jsonl_to_bin(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("A whole book in one file.\n")
    (data / "b.jsonl").write_text(json.dumps({"text": "first"}) + "\n{oops\n" + json.dumps({"text": "second"}) + "\n")
    out = tmp_path / "out" / "train.bin"
    result = prepare("--tokenizer", "builtin:bytes", "--input", data, "--output", out,
                     "--cache-dir", tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert f"{data}/b.jsonl:2: malformed JSON" in result.stderr
    tokenizer = byte_tokenizer()
    documents = [[0] + tokenizer(t, add_special_tokens=False)["input_ids"] + [1]
                 for t in ("A whole book in one file.\n", "first", "second")]
    assert read_tokens(out).tolist() == sum(documents, [])
    info = json.loads(Path(f"{out}.json").read_text())
    assert (info["num_documents"], info["num_tokens"], info["tokenizer"]) == (3, 43, "builtin:bytes")
    assert re.search(r"│ total +│ +3 │ +43 │", result.stdout)


def test_errors_are_one_message_and_exit_2(tmp_path):
    result = prepare("--tokenizer", "builtin:bytes", "--input", tmp_path / "missing", "--output", tmp_path / "x.bin")
    assert result.returncode == 2
    assert "error: --input = " in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.bin").exists()


def test_no_input_is_ever_overwritten(tmp_path):
    """--output on the input itself, on its sidecar's name, and inside an input folder through a link."""
    text = tmp_path / "x.txt"
    text.write_text("Keep me.\n")
    sidecar_input = tmp_path / "side.bin.json"
    sidecar_input.write_text('{"text": "and me"}\n')
    (tmp_path / "link").symlink_to(tmp_path)
    cases = [(text, text), (sidecar_input, tmp_path / "side.bin"), (tmp_path, tmp_path / "link" / "x.txt")]
    for source, output in cases:
        result = prepare("--tokenizer", "builtin:bytes", "--input", source, "--output", output,
                         "--cache-dir", tmp_path / "cache")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "would overwrite the input" in " ".join(result.stderr.split())
    assert text.read_text() == "Keep me.\n" and sidecar_input.read_text() == '{"text": "and me"}\n'
