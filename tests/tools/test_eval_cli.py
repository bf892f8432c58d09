"""tools/eval_ppl.py and tools/passkey.py end to end on a saved tiny model, and their bad-input errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.evaluation.cli import eval_ppl_main, passkey_main
from harness.evaluation.perplexity import longlora_perplexity, strided_perplexity

ROOT = Path(__file__).resolve().parents[2]
TEXT = "It was a bright cold day in April, and the clocks were striking thirteen. " * 40  # 2,960 bytes


@pytest.fixture
def model_dir(tmp_path, tiny_model, byte_tokenizer):
    """The tiny random LLaMA and the byte tokenizer, saved as a Hugging Face directory."""
    path = tmp_path / "tiny"
    tiny_model.save_pretrained(path)
    byte_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "book.txt"
    path.write_text(TEXT)
    return path


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def text_tokens(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return np.asarray(tokenizer(TEXT, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])


def load_model(model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir).eval()


def test_eval_ppl_end_to_end(model_dir, text_file, tmp_path):
    out = run_tool("tools/eval_ppl.py", "--model", str(model_dir), "--model", str(model_dir), "--label", "a",
                   "--label", "b", "--data", str(text_file), "--seq-lens", "64,128", "--stride", "40", "--max-tokens", "1000",
                   "--json", str(tmp_path / "ppl.json"), "--plot", str(tmp_path / "ppl.png"))
    assert out.returncode == 0, out.stderr
    assert "Perplexity" in out.stdout
    rows = json.loads((tmp_path / "ppl.json").read_text())["results"]
    assert [(r["model"], r["seq_len"], r["protocol"], r["adapter"]) for r in rows] == [
        ("a", 64, "strided", None), ("a", 128, "strided", None), ("b", 64, "strided", None), ("b", 128, "strided", None)]
    expected = strided_perplexity(load_model(model_dir), text_tokens(model_dir), 64, stride=40, max_tokens=1000)
    assert rows[0]["ppl"] == pytest.approx(expected.ppl, rel=1e-5)
    assert rows[0]["ppl"] == rows[2]["ppl"] and rows[0]["tokens"] == 999  # every token but the first
    assert (tmp_path / "ppl.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_ppl_longlora_in_process(model_dir, text_file, tmp_path, capsys):
    code = eval_ppl_main(["--model", str(model_dir), "--data", str(text_file.parent), "--seq-lens", "256",
                          "--protocol", "longlora", "--sliding-window", "100", "--max-tokens", "2000",
                          "--batch-size", "4", "--json", str(tmp_path / "ppl.json")])
    assert code == 0
    [row] = json.loads((tmp_path / "ppl.json").read_text())["results"]
    expected = longlora_perplexity(load_model(model_dir), text_tokens(model_dir), 256, sliding_window=100,
                                   max_tokens=2000)
    assert (row["ppl"], row["tokens"]) == (pytest.approx(expected.ppl, rel=1e-5), expected.tokens)
    assert "256" in capsys.readouterr().out


def test_passkey_in_process(model_dir, tmp_path, capsys):
    code = passkey_main(["--model", str(model_dir), "--lengths", "300,400", "--depths", "0,1", "--trials", "2",
                         "--json", str(tmp_path / "passkey.json"), "--plot", str(tmp_path / "passkey.png")])
    assert code == 0
    saved = json.loads((tmp_path / "passkey.json").read_text())
    assert (saved["lengths"], saved["depths"], len(saved["trials"])) == ([300, 400], [0.0, 1.0], 8)
    assert (tmp_path / "passkey.png").exists()
    assert "Passkey" in capsys.readouterr().out


@pytest.mark.parametrize("args,expected", [
    (["--data", "{text}", "--seq-lens", "64,abc"], "argument --seq-lens: '64,abc' is not a comma-separated list"),
    (["--data", "missing.txt"], "--data missing.txt: no such file or directory"),
    (["--data", "{text}", "--adapter", "no/such/adapter"], "--adapter no/such/adapter: no such directory"),
    (["--data", "{text}", "--seq-lens", "64,4096"], "--seq-lens 4096 with --data {text}: seq_len=4096 does not fit"),
])
def test_eval_ppl_bad_input(model_dir, text_file, args, expected):
    args = [a.replace("{text}", str(text_file)) for a in args]
    out = run_tool("tools/eval_ppl.py", "--model", str(model_dir), *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    # The last line (before it, at most the loader's own progress bar) is the error.
    assert out.stderr.strip().splitlines()[-1].startswith(
        "tools/eval_ppl.py: error: " + expected.replace("{text}", str(text_file)))


def test_missing_model_and_bad_depths(tmp_path):
    out = run_tool("tools/eval_ppl.py", "--model", "./no_such_model", "--data", "x.txt")
    assert (out.returncode, out.stderr) == (2, "tools/eval_ppl.py: error: --model ./no_such_model: no such file or directory\n")
    out = run_tool("tools/passkey.py", "--model", "m", "--depths", "0,2")
    assert (out.returncode, out.stderr) == (2, "tools/passkey.py: error: argument --depths: '0,2': every depth must lie in [0, 1]\n")


def test_adapter_for_another_base(monkeypatch, model_dir, text_file, tmp_path, capsys):
    import harness.model

    def mismatched(*args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict for PeftModelForCausalLM:\n\tsize mismatch for "
                           "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")

    monkeypatch.setattr(harness.model, "load_for_eval", mismatched)
    assert eval_ppl_main(["--model", str(model_dir), "--adapter", str(tmp_path), "--data", str(text_file)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"tools/eval_ppl.py: error: --adapter {tmp_path} does not fit --model {model_dir}")


def test_bin_data_and_its_vocabulary(model_dir, tmp_path, capsys):
    from harness.data.tokens import write_tokens

    ids = np.random.default_rng(0).integers(4, 260, size=600)
    write_tokens(tmp_path / "eval.bin", [ids], vocab_size=260, tokenizer_name="builtin:bytes")
    argv = ["--model", str(model_dir), "--data", str(tmp_path / "eval.bin"), "--seq-lens", "100,200",
            "--json", str(tmp_path / "ppl.json")]
    assert eval_ppl_main(argv) == 0
    rows = json.loads((tmp_path / "ppl.json").read_text())["results"]
    expected = strided_perplexity(load_model(model_dir), ids, 200)
    assert (rows[1]["ppl"], rows[1]["tokens"]) == (pytest.approx(expected.ppl, rel=1e-5), 599)

    write_tokens(tmp_path / "other.bin", [[5, 300, 7] * 100], vocab_size=32000, tokenizer_name="llama")
    assert eval_ppl_main(["--model", str(model_dir), "--data", str(tmp_path / "other.bin"), "--seq-lens", "100"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith(f"holds token id 300, but --model {model_dir} has 260 ids: the data was tokenized for "
                         f"another model")
    assert eval_ppl_main(["--model", str(model_dir), "--data", str(tmp_path / "eval.bin"), "--seq-lens", "700"]) == 2
    assert "seq_len=700 does not fit the data: the strided protocol needs at least 700 tokens, the data has 600" in (
        capsys.readouterr().err)
