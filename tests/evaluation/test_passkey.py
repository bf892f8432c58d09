"""Passkey prompts (length, depth, determinism), scoring through a stub generate_fn, and reports."""
from __future__ import annotations

import json
import re

import pytest

from harness.evaluation.passkey import (
    FILLER,
    QUESTION,
    TASK,
    _largest_fitting,
    answer_digits,
    build_prompt,
    evaluate_passkey,
    info_line,
    passkeys,
)
from harness.evaluation.perplexity import EvaluationError
from harness.evaluation.report import passkey_table, plot_passkey, write_passkey_json

SENTENCE = max(len(s) for s in FILLER) + 1  # byte tokens of the longest filler sentence and its space


@pytest.mark.parametrize("length", [300, 777, 2000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompt_fits_target_length(byte_tokenizer, length, depth):
    prompt = build_prompt(byte_tokenizer, length, depth, "12345")
    assert length - SENTENCE <= len(prompt.input_ids) <= length
    assert prompt.input_ids == byte_tokenizer(prompt.text).input_ids
    assert prompt.text.startswith(TASK) and prompt.text.endswith(QUESTION)
    assert prompt.text.count(info_line("12345")) == 1


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_key_sits_at_depth(byte_tokenizer, depth):
    prompt = build_prompt(byte_tokenizer, 4000, depth, "54321")
    before, after = prompt.text.split(info_line("54321"))
    filler_before = sum(before.count(s) for s in FILLER)
    assert filler_before == round(depth * prompt.filler_sentences)
    assert sum(after.count(s) for s in FILLER) == prompt.filler_sentences - filler_before
    # The fixed lines (task, key line, question) are ~6% of 4000 bytes.
    assert len(before) / len(prompt.text) == pytest.approx(depth, abs=0.06)


def test_prompt_too_short_for_fixed_text(byte_tokenizer):
    with pytest.raises(EvaluationError, match="passkey length 100"):
        build_prompt(byte_tokenizer, 100, 0.5, "12345")


def test_keys_are_deterministic_five_digit(byte_tokenizer):
    keys = passkeys(7, 20)
    assert keys == passkeys(7, 20) and keys != passkeys(8, 20)
    assert all(re.fullmatch(r"[1-9]\d{4}", key) for key in keys)
    assert build_prompt(byte_tokenizer, 500, 0.5, keys[0]) == build_prompt(byte_tokenizer, 500, 0.5, keys[0])


@pytest.mark.parametrize("guess", [0, 1, 3, 40, 41, 42, 1000])
def test_largest_fitting_from_any_guess(guess):
    assert _largest_fitting(lambda n: n <= 41, guess) == 41
    assert _largest_fitting(lambda n: n <= 0, guess) == 0


def test_answer_digits():
    assert answer_digits(" 12345. Remember") == "12345"
    assert answer_digits(" is 123 45") == "123"
    assert answer_digits(" the grass") is None


def key_in_prompt_stub(tokenizer, answer_when):
    """A generate_fn that reads the key from the prompt, answering it only where answer_when(prompt)."""
    calls = []

    def generate(input_ids, max_new_tokens):
        text = tokenizer.decode(input_ids)
        calls.append((len(input_ids), max_new_tokens))
        key = re.search(r"The pass key is (\d+)\. Remember", text).group(1)
        return f" {key}. Remember it." if answer_when(text) else " 99999."

    return generate, calls


def test_scoring_with_stub(byte_tokenizer):
    # Answers only when the key sits in the first half of the prompt.
    generate, calls = key_in_prompt_stub(byte_tokenizer, lambda text: text.index("The pass key") < len(text) / 2)
    result = evaluate_passkey(None, byte_tokenizer, [400, 800], [0.0, 0.25, 1.0], trials=3, seed=1,
                              generate_fn=generate)
    assert result.accuracy() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    assert len(result.trials) == len(calls) == 18
    assert all(n <= 800 and budget >= 6 for n, budget in calls)  # " 12345" is 6 byte tokens
    assert [t.key for t in result.trials[:3]] == passkeys(1, 3)
    again = evaluate_passkey(None, byte_tokenizer, [400, 800], [0.0, 0.25, 1.0], trials=3, seed=1,
                             generate_fn=key_in_prompt_stub(byte_tokenizer, lambda text: True)[0])
    assert [t.key for t in again.trials] == [t.key for t in result.trials]
    assert again.accuracy() == [[1.0] * 3] * 2


def test_real_tiny_model_runs(tiny_model, byte_tokenizer):
    progress = []
    result = evaluate_passkey(tiny_model, byte_tokenizer, [300], [0.0, 1.0], trials=1, seed=0,
                              progress=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 2), (2, 2)]
    assert [(t.length, t.depth, t.trial) for t in result.trials] == [(300, 0.0, 0), (300, 1.0, 0)]
    assert all(isinstance(t.answer, str) and t.tokens <= 300 for t in result.trials)
    assert len(result.accuracy()) == 1 and len(result.accuracy()[0]) == 2


@pytest.mark.parametrize("lengths,depths,trials,match", [
    ([0], [0.5], 1, "lengths"), ([300], [1.5], 1, "depths"), ([300], [], 1, "depths"), ([300], [0.5], 0, "trials"),
])
def test_bad_grid(byte_tokenizer, lengths, depths, trials, match):
    with pytest.raises(EvaluationError, match=match):
        evaluate_passkey(None, byte_tokenizer, lengths, depths, trials, generate_fn=lambda ids, n: "")


def test_reports(byte_tokenizer, tmp_path):
    generate, _ = key_in_prompt_stub(byte_tokenizer, lambda text: True)
    result = evaluate_passkey(None, byte_tokenizer, [300, 600], [0.0, 0.5, 1.0], trials=2, generate_fn=generate)
    table = passkey_table(result)
    assert [c.header for c in table.columns] == ["length", "depth 0", "depth 0.5", "depth 1"]
    assert table.row_count == 2
    write_passkey_json(result, tmp_path / "passkey.json")
    saved = json.loads((tmp_path / "passkey.json").read_text())
    assert saved["accuracy"] == [[1.0] * 3] * 2 and len(saved["trials"]) == 12
    assert set(saved["trials"][0]) == {"length", "depth", "trial", "key", "answer", "correct", "tokens"}
    plot_passkey(result, tmp_path / "passkey.png")
    assert (tmp_path / "passkey.png").read_bytes()[:4] == b"\x89PNG"
