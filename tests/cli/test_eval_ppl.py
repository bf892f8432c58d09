"""tools/eval_ppl.py (harness.cli.eval_ppl) end to end on a saved tiny model: data forms, bad-input errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from harness.cli.eval_ppl import main as eval_ppl_main
from harness.evaluation.perplexity import longlora_perplexity, strided_perplexity
from tests.conftest import ROOT, tiny_llama_config

TEXT = "It was a bright cold day in April, and the clocks were striking thirteen. " * 40  # 2,960 bytes


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


@pytest.mark.slow  # 44 s
def test_eval_ppl_end_to_end(model_dir, text_file, tmp_path):
    out = run_tool("tools/eval_ppl.py", "--model", str(model_dir), "--model", str(model_dir), "--label", "a",
                   "--label", "b", "--data", str(text_file), "--seq-lens", "64,128", "--stride", "40",
                   "--max-tokens", "1000",
                   "--json", str(tmp_path / "ppl.json"), "--plot", str(tmp_path / "ppl.png"))
    assert out.returncode == 0, out.stderr
    assert "Perplexity" in out.stdout
    rows = json.loads((tmp_path / "ppl.json").read_text())["results"]
    assert [(r["model"], r["seq_len"], r["protocol"], r["adapter"]) for r in rows] == [
        ("a", 64, "strided", None), ("a", 128, "strided", None),
        ("b", 64, "strided", None), ("b", 128, "strided", None)]
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


def test_missing_model(tmp_path):
    out = run_tool("tools/eval_ppl.py", "--model", "./no_such_model", "--data", "x.txt")
    assert (out.returncode, out.stderr) == (
        2, "tools/eval_ppl.py: error: --model ./no_such_model: no such file or directory\n")


def test_adapter_for_another_base(model_dir, text_file, tmp_path, capsys):
    """An adapter made for a base of another width: one line that says so, no traceback."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from harness.recipe import load_recipe, save_recipe

    adapter = tmp_path / "other-adapter"
    other = LlamaForCausalLM(tiny_llama_config(hidden_size=32, intermediate_size=64))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(adapter)
    recipe = load_recipe(ROOT / "recipes" / "tiny_cpu.toml", ["position.target_length=2048"])  # tiny: 1024 tokens
    save_recipe(recipe, adapter / "recipe.toml")
    assert eval_ppl_main(["--model", str(model_dir), "--adapter", str(adapter), "--data", str(text_file)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("tools/eval_ppl.py: error: ") and "different base model" in line


def test_data_as_training_reads_it(model_dir, text_file, tmp_path, monkeypatch):
    """A glob, a .jsonl file with --text-field, hub:owner/name with --split: the same text, the same perplexity."""
    import datasets

    def load_dataset(name, split, streaming):
        assert (name, split, streaming) == ("someone/books", "validation", False)
        return [{"text": TEXT}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    (tmp_path / "book.jsonl").write_text(json.dumps({"body": TEXT}) + "\n")
    common = ["--model", str(model_dir), "--seq-lens", "64", "--max-tokens", "500"]
    ppl = []
    for data in (["--data", str(text_file)], ["--data", str(text_file.parent / "*.txt")],
                 ["--data", str(tmp_path / "book.jsonl"), "--text-field", "body"],
                 ["--data", "hub:someone/books", "--split", "validation"]):
        assert eval_ppl_main([*common, *data, "--json", str(tmp_path / "ppl.json")]) == 0
        ppl.append(json.loads((tmp_path / "ppl.json").read_text())["results"][0]["ppl"])
    assert len(set(ppl)) == 1


def test_help_states_the_data_grammar():
    out = run_tool("tools/eval_ppl.py", "--help")
    text = " ".join(out.stdout.split())
    assert out.returncode == 0 and "hub:owner/name" in text and "(default: test)" in text


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
