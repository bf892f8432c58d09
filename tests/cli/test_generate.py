"""tools/generate.py (harness.cli.generate) on a trained tiny run: --adapter alone, the merged directory,
the window refusal, the KV-cache report, --chat history (template and plain transcript), bad input.

References decode with transformers' own `model.generate` on prompts built here by hand."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from harness.cli.generate import main as generate_main
from harness.evaluation.models import ModelSpec, load_model
from tests.conftest import ROOT, in_repo
from tests.test_generation import PROMPT, merged_run, tiny_run

pytestmark = pytest.mark.usefixtures("session_cache")


@pytest.fixture(scope="module")
def final(tmp_path_factory, cache):
    return tiny_run(tmp_path_factory, cache)


@pytest.fixture(scope="module")
def trained(final, cache):
    """(model, tokenizer) of base + adapter, for the references."""
    with in_repo(cache):
        model, tokenizer, _ = load_model(ModelSpec("", adapter=str(final)))
    return model, tokenizer


def reference(model, tokenizer, ids: list[int], max_new_tokens: int, stop: str | None = None) -> str:
    """transformers' greedy decoding of `ids`, decoded without special tokens (cut at `stop`)."""
    with torch.no_grad():
        output = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
    return text.split(stop)[0] if stop else text


def lines_starting(err: str, prefix: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(prefix)]


# --------------------------------------------------------------------------- one prompt

def test_adapter_alone_streams_the_answer_and_reports_the_kv_cache(final, trained, capsys):
    code = generate_main(["--adapter", str(final), "--prompt", PROMPT, "--max-new-tokens", "24", "--no-template"])
    out, err = capsys.readouterr()
    model, tokenizer = trained
    ids = tokenizer(PROMPT).input_ids  # 74 byte tokens
    assert code == 0 and out == reference(model, tokenizer, ids, 24) + "\n"
    assert lines_starting(err, "random+final:") == [
        "random+final: window 512 tokens (yarn x2 rope over the original 256); KV cache at the full window "
        "256.0 KiB (2 x 2 layers x 2 KV heads x 16 dims x 512 tokens x 4 bytes)"]
    # 74 + 24 - 1 cached positions (the last new token is never fed back): 2 x 2 x 2 x 16 x 97 x 4 bytes
    assert lines_starting(err, "prompt") == [
        "prompt 74 tokens + 24 new; KV cache 48.5 KiB measured, 48.5 KiB computed "
        "(2 x 2 layers x 2 KV heads x 16 dims x 97 tokens x 4 bytes)"]


def test_merged_directory_answers_as_base_plus_adapter(final, cache, capsys):
    merged = merged_run(final, "original", cache)
    answers = []
    for model in (["--adapter", str(final)], ["--model", str(merged)]):  # through the chat template
        assert generate_main([*model, "--prompt", "Where is the river?", "--max-new-tokens", "20"]) == 0
        out, err = capsys.readouterr()
        answers.append(out)
        assert "window 512 tokens (yarn x2 rope over the original 256)" in err
    assert answers[0] == answers[1] and answers[0].strip()


@pytest.mark.slow  # 48 s
def test_window_past_the_original_accepted_and_past_the_extended_refused(final, cache, tmp_path):
    env = {**os.environ, "HARNESS_CACHE": str(cache)}
    (tmp_path / "400.txt").write_text("x" * 400)
    (tmp_path / "600.txt").write_text("x" * 600)
    accepted = subprocess.run([sys.executable, "-m", "harness", "generate", "--adapter", str(final), "--prompt-file",
                               str(tmp_path / "400.txt"), "--no-template", "--max-new-tokens", "8"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert accepted.returncode == 0, accepted.stderr
    assert lines_starting(accepted.stderr, "prompt 400 tokens + 8 new;")
    assert "predefined maximum length" not in accepted.stderr  # transformers' warning when the rope is lost
    refused = subprocess.run([sys.executable, "tools/generate.py", "--adapter", str(final), "--prompt-file",
                              str(tmp_path / "600.txt"), "--no-template"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr.splitlines()[-1] == (
        "tools/generate.py: error: the prompt is 600 tokens, over the model's window of 512 tokens (yarn x2 rope "
        "over the original 256): shorten it by at least 89 tokens to leave room for an answer")


# --------------------------------------------------------------------------- --chat

def test_chat_carries_the_history_through_the_template(final, trained, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Where is the river?\n\nAnd the fish?\n/exit\nnever read\n"))
    assert generate_main(["--adapter", str(final), "--chat", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    model, tokenizer = trained
    history = [{"role": "user", "content": "Where is the river?"}]
    first_ids = tokenizer.apply_chat_template(history, add_generation_prompt=True)["input_ids"]
    first = reference(model, tokenizer, first_ids, 12)
    history += [{"role": "assistant", "content": first.strip()}, {"role": "user", "content": "And the fish?"}]
    second_ids = tokenizer.apply_chat_template(history, add_generation_prompt=True)["input_ids"]
    second = reference(model, tokenizer, second_ids, 12)
    assert first.strip() and first.strip() in tokenizer.decode(second_ids)  # the second prompt holds the answer
    assert out == f"> {first}\n> > {second}\n> "  # the empty line is skipped, /exit ends
    prompts = [line.split(" tokens")[0] for line in lines_starting(err, "prompt ")]
    assert prompts == [f"prompt {len(first_ids)}", f"prompt {len(second_ids)}"]


def test_chat_plain_transcript_with_a_first_turn_and_a_system_message(final, trained, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("And the fish?\n"))  # then EOF
    assert generate_main(["--adapter", str(final), "--chat", "--no-template", "--system", "A fishing talk.",
                          "--prompt", "Where is the river?", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    model, tokenizer = trained
    transcript = "A fishing talk.\n\nUser: Where is the river?\nAssistant:"
    first = reference(model, tokenizer, tokenizer(transcript).input_ids, 12, stop="\nUser:")
    transcript += f" {first.strip()}\nUser: And the fish?\nAssistant:"
    second = reference(model, tokenizer, tokenizer(transcript).input_ids, 12, stop="\nUser:")
    assert out == f"> Where is the river?\n{first}\n> {second}\n> \n"  # EOF: a newline for the shell
    assert lines_starting(err, "prompt ")[1].startswith(f"prompt {len(tokenizer(transcript).input_ids)} tokens")


def test_chat_turn_too_long_is_refused_and_the_talk_goes_on(final, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("y" * 600 + "\nshort\n"))
    assert generate_main(["--adapter", str(final), "--chat", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "tools/generate.py: error: the prompt is 618 tokens, over the model's window of 512 tokens" in err
    assert len(lines_starting(err, "prompt ")) == 1 and out.count("> ") >= 3


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv,message", [
    ([], "no prompt: give --prompt TEXT or --prompt-file FILE, or --chat to talk"),
    (["--prompt", "x"], "no model: give --adapter DIR (a checkpoint or final/ directory) or --model M (a merged "
                        "directory, hub id or .gguf file)"),
    (["--prompt", "x", "--prompt-file", "p.txt"], "argument --prompt-file: not allowed with argument --prompt"),
    (["--adapter", "a", "--prompt", "x", "--top-p", "0"], "argument --top-p: '0' must lie in (0, 1]"),
    (["--adapter", "a", "--prompt", "x", "--top-p", "0.5"],
     "--top-p 0.5 samples, but --temperature 0 decodes greedily: give --temperature > 0 too (e.g. 0.7)"),
    (["--adapter", "a", "--prompt-file", "/no/such.txt"],
     "--prompt-file /no/such.txt: cannot read it (FileNotFoundError: No such file or directory)"),
    (["--adapter", "/no/such/run", "--prompt", "x"], "--adapter /no/such/run: no such directory"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    assert generate_main(argv) == 2
    assert capsys.readouterr().err == f"tools/generate.py: error: {message}\n"


def test_system_message_without_a_template_is_refused(final, capsys):
    assert generate_main(["--adapter", str(final), "--prompt", "x", "--no-template", "--system", "Be brief."]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "tools/generate.py: error: --system 'Be brief.' needs a chat template, and this prompt is plain text (the "
        "tokenizer has none, or --no-template): put it in the prompt")
