"""SFT: exact label masks in the three formats (multi-turn), truncation, bad conversations."""
from __future__ import annotations

import json
import logging

import datasets
import pytest

from harness.data import DataError
from harness.data.sft import VICUNA_SYSTEM, build_sft

datasets.disable_progress_bars()

REPLIES = ["Bonjour, café!", "Deux:\n1. un\n2. deux"]  # multi-byte and newlines in the targets


def sft(tokenizer, tmp_path, records, **settings):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    settings = {"max_seq_length": 1024, "cache_dir": str(tmp_path / ".cache"), **settings}
    return build_sft(tokenizer, seed=0, path=str(path), **settings)


def label_runs(tokenizer, labels) -> list[str]:
    """The decoded text of each run of consecutive target tokens."""
    runs, run = [], []
    for label in labels + [-100]:
        if label != -100:
            run.append(label)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


def only(splits) -> dict:
    assert len(splits.train) == 1
    return splits.train[0]


def test_vicuna_multi_turn(byte_tokenizer, tmp_path):
    record = {"conversation": [{"human": "Salut?", "assistant": REPLIES[0]},
                               {"human": "Compte.", "assistant": REPLIES[1]}]}
    item = only(sft(byte_tokenizer, tmp_path, [record]))
    assert byte_tokenizer.decode(item["input_ids"]) == (
        f"<s>{VICUNA_SYSTEM} USER: Salut? ASSISTANT: {REPLIES[0]}</s>USER: Compte. ASSISTANT: {REPLIES[1]}</s>")
    assert label_runs(byte_tokenizer, item["labels"]) == [REPLIES[0] + "</s>", REPLIES[1] + "</s>"]
    assert item["position_ids"] == list(range(len(item["input_ids"])))


def test_vicuna_input_output_and_system_prompt(byte_tokenizer, tmp_path):
    item = only(sft(byte_tokenizer, tmp_path, [{"input": "Q", "output": "A"}], system_prompt="Be brief.",
                    add_bos=False))
    assert byte_tokenizer.decode(item["input_ids"]) == "Be brief. USER: Q ASSISTANT: A</s>"
    assert label_runs(byte_tokenizer, item["labels"]) == ["A</s>"]


def test_sharegpt_multi_turn_with_system(byte_tokenizer, tmp_path):
    record = {"conversations": [{"from": "system", "value": "SYS"}, {"from": "human", "value": "q1"},
                                {"from": "gpt", "value": REPLIES[0]}, {"from": "human", "value": "q2"},
                                {"from": "gpt", "value": REPLIES[1]}]}
    item = only(sft(byte_tokenizer, tmp_path, [record], format="sharegpt"))
    assert byte_tokenizer.decode(item["input_ids"]) == (
        f"<s>SYS USER: q1 ASSISTANT: {REPLIES[0]}</s>USER: q2 ASSISTANT: {REPLIES[1]}</s>")
    assert label_runs(byte_tokenizer, item["labels"]) == [REPLIES[0] + "</s>", REPLIES[1] + "</s>"]


MESSAGES = {"messages": [{"role": "system", "content": "SYS"}, {"role": "user", "content": "q1"},
                         {"role": "assistant", "content": REPLIES[0]}, {"role": "user", "content": "q2"},
                         {"role": "assistant", "content": REPLIES[1]}]}


def test_messages_with_generation_tags(byte_tokenizer, tmp_path):
    assert "{% generation %}" in byte_tokenizer.chat_template
    item = only(sft(byte_tokenizer, tmp_path, [MESSAGES], format="messages"))
    assert byte_tokenizer.decode(item["input_ids"]) == (
        f"<s>SYS\nUSER: q1\nASSISTANT: {REPLIES[0]}</s>USER: q2\nASSISTANT: {REPLIES[1]}</s>")
    assert label_runs(byte_tokenizer, item["labels"]) == [REPLIES[0] + "</s>", REPLIES[1] + "</s>"]


def test_messages_without_generation_tags_use_prefixes(byte_tokenizer, tmp_path):
    tagged = only(sft(byte_tokenizer, tmp_path, [MESSAGES]))
    template = byte_tokenizer.chat_template
    byte_tokenizer.chat_template = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    # A newline after each reply: template formatting, which the prefix method leaves out of the targets.
    byte_tokenizer.chat_template = byte_tokenizer.chat_template.replace("</s>", "</s>\n")
    item = only(sft(byte_tokenizer, tmp_path, [MESSAGES]))
    assert label_runs(byte_tokenizer, item["labels"]) == label_runs(byte_tokenizer, tagged["labels"])
    assert byte_tokenizer.decode(item["input_ids"]).count("</s>\n") == 2


def test_auto_detects_the_format_per_record(byte_tokenizer, tmp_path):
    records = [{"input": "a", "output": "A"}, {"conversations": [{"from": "human", "value": "b"},
                                                                 {"from": "gpt", "value": "B"}]},
               {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "C"}]}]
    splits = sft(byte_tokenizer, tmp_path, records)
    assert [label_runs(byte_tokenizer, item["labels"]) for item in splits.train] == [["A</s>"], ["B</s>"], ["C</s>"]]


def test_truncation_never_leaves_a_sample_without_targets(byte_tokenizer, tmp_path, caplog):
    records = [{"input": "short", "output": "kept whole"},
               {"input": "x" * 300, "output": "cut off"},           # the reply starts after the limit
               {"input": "y", "output": "z" * 300}]                 # the reply is cut, but some remains
    splits = sft(byte_tokenizer, tmp_path, records, max_seq_length=200, system_prompt="S")
    assert len(splits.train) == 2
    assert splits.stats.skipped == {"no target within max_seq_length=200": 1}
    assert splits.stats.truncated == {"train": 1}
    assert any(r.getMessage().startswith(f"{tmp_path / 'chats.jsonl'}:2: the first assistant token is at position")
               for r in caplog.records)
    cut = splits.train[1]
    assert len(cut["input_ids"]) == len(cut["labels"]) == 200
    assert set(label_runs(byte_tokenizer, cut["labels"])[0]) == {"z"}


def test_bad_conversations_are_reported(byte_tokenizer, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="harness.data")
    records = [{"conversations": [{"from": "bot", "value": "?"}]},
               {"conversation": [{"human": "no reply"}]},
               {"messages": [{"role": "user", "content": "only a question"}]},
               {"conversations": []},
               {"prompt": "unknown shape"},
               {"input": "good", "output": "one"}]
    splits = sft(byte_tokenizer, tmp_path, records)
    assert splits.stats.skipped == {"malformed conversation": 1, "missing field": 2, "no assistant reply": 1,
                                    "empty": 1}
    messages = [r.getMessage() for r in caplog.records]
    path = tmp_path / "chats.jsonl"
    assert any(m.startswith(f"{path}:1: turn 0: unknown speaker 'from': 'bot'") for m in messages)
    assert any(m.startswith(f"{path}:2: turn 0: no field 'assistant'") for m in messages)
    assert any(m.startswith(f"{path}:5: no 'messages', 'conversations'") for m in messages)
    with pytest.raises(DataError, match=rf"{path}:1: turn 0: unknown speaker"):
        sft(byte_tokenizer, tmp_path, records, strict=True)


def test_messages_need_a_chat_template(byte_tokenizer, tmp_path):
    byte_tokenizer.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        sft(byte_tokenizer, tmp_path, [MESSAGES])


@pytest.mark.parametrize("role", ["User", "tool", "asistant"])
def test_messages_with_an_unknown_role_are_refused_by_name(byte_tokenizer, tmp_path, caplog, role):
    """A role the masking does not know is not rendered as a reply and trained on: the record is
    skipped with its file:line, the role and the allowed ones, as for an unknown ShareGPT speaker."""
    caplog.set_level(logging.WARNING, logger="harness.data")
    records = [{"messages": [{"role": "user", "content": "q"}, {"role": role, "content": "not a reply"},
                             {"role": "assistant", "content": "a"}]}, MESSAGES]
    splits = sft(byte_tokenizer, tmp_path, records)
    assert splits.stats.skipped == {"malformed conversation": 1} and len(splits.train) == 1
    path = tmp_path / "chats.jsonl"
    expected = f"{path}:1: turn 1: unknown role 'role': {role!r}; skipped (use one of system, user, assistant)"
    assert expected in [r.getMessage() for r in caplog.records]
    with pytest.raises(DataError, match=rf"{path}:1: turn 1: unknown role 'role': {role!r}; use one of system, user"):
        sft(byte_tokenizer, tmp_path, records, strict=True)
