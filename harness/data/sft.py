"""Long SFT: conversations whose loss falls on the assistant tokens only, multi-turn included.

Record formats (data.format; "auto" picks one per record from its fields):
- ``vicuna``: {"input", "output"} (LongQLoRA's single-turn records) or
  {"conversation": [{"human", "assistant"}, ...]}; an optional "system" field;
- ``sharegpt``: {"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]};
- ``messages``: {"messages": [{"role": "system" | "user" | "assistant", "content"}, ...]}.

vicuna and sharegpt records are rendered with the Vicuna v1.1 template (FastChat's
"vicuna_v1.1", which the paper uses for Vicuna-13B):

    {system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

with the record's system prompt, else data.system_prompt, else the standard Vicuna one, and
the tokenizer's EOS token as </s>. Targets are each reply and its </s>. The text is tokenized
whole, and a token is a target when its character span (from the fast tokenizer's offsets)
overlaps a reply, so labels are exact whatever the token boundaries.

messages records are rendered with the tokenizer's chat template. When the template marks
assistant text with {% generation %}, transformers returns the mask
(return_assistant_tokens_mask). Otherwise the reply of message i runs from the end of
messages[:i] rendered with add_generation_prompt=True to the end of messages[:i+1] rendered,
less trailing whitespace; each of these renderings must be a prefix of the whole
conversation's (checked), and the character spans become token targets as above.

data.add_bos puts BOS in front unless the rendering starts with it already. Samples are cut to
max_seq_length; one left without target tokens is dropped, warned about and counted.
"""
from __future__ import annotations

import json
import re
from functools import partial

import numpy as np

from harness.data import DataError, DataSplits, DataStats
from harness.data.pipeline import (ContentHash, build_splits, cached_map, digest, keep, sample_features,
                                   tokenizer_fingerprint)
from harness.data.sources import Record, Report, iter_records

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
FORMATS = ("auto", "vicuna", "sharegpt", "messages")
MESSAGE_ROLES = ("system", "user", "assistant")  # what the loss masking knows: replies are the assistant's
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class _BadRecord(Exception):
    def __init__(self, reason: str, detail: str, hint: str):
        super().__init__(detail)
        self.reason, self.detail, self.hint = reason, detail, hint


def build_sft(tokenizer, *, seed: int, path: str, split: str = "train", format: str = "auto",
              system_prompt: str = "", max_seq_length: int, min_tokens: int = 0, add_bos: bool = True,
              eval_fraction: float = 0.0, eval_path: str = "", streaming: bool = False, strict: bool = False,
              cache_dir: str = "", num_proc: int = 1) -> DataSplits:
    """The "sft" data backend: tokenized conversations, see the module docstring."""
    if format not in FORMATS:
        raise DataError(f"data.format = {format!r} is not one of {', '.join(FORMATS)}")
    if max_seq_length <= 0:
        raise DataError(f"data.max_seq_length = {max_seq_length} must be positive")
    prepare = partial(load_conversations, tokenizer, format=format, system_prompt=system_prompt,
                      max_seq_length=max_seq_length, min_tokens=min_tokens, add_bos=add_bos, split=split,
                      streaming=streaming, strict=strict, cache_dir=cache_dir, num_proc=num_proc)
    shape = partial(_shape, max_seq_length=max_seq_length, cache_dir=cache_dir, num_proc=num_proc)
    stats = DataStats(source=path, mode="sft", max_seq_length=max_seq_length)
    return build_splits(prepare, shape, path=path, eval_path=eval_path, eval_fraction=eval_fraction, seed=seed,
                        stats=stats, truncates=True)


def load_conversations(tokenizer, path: str, key: str, *, format: str = "auto", system_prompt: str = "",
                       max_seq_length: int, min_tokens: int = 0, add_bos: bool = True, split: str = "train",
                       streaming: bool = False, strict: bool = False, cache_dir: str = "", num_proc: int = 1):
    """Tokenized conversations of `path` with a target within max_seq_length.

    Returns (dataset with columns input_ids, labels, length, first_target, where; the Report;
    the cache key).
    """
    from datasets import Dataset, Features, List, Value  # here: importing datasets takes a second

    report = Report(key, path, strict=strict, noun="conversations")
    templates, conversations, wheres, content = _read_conversations(path, report, format, split, streaming)
    if not conversations:
        raise report.nothing_left()
    _check_tokenizer(tokenizer, set(templates), f"{key} = {path!r}")
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    docs_key = digest(tokenizer_fingerprint(tokenizer), content.hexdigest(), system_prompt, bos)
    docs = cached_map(
        Dataset.from_dict({"template": templates, "messages": conversations, "where": wheres}), _tokenize,
        stage="conversations", key=docs_key, cache_dir=cache_dir, num_proc=num_proc,
        fn_kwargs={"tokenizer": tokenizer, "system_prompt": system_prompt, "bos": bos},
        remove_columns=["template", "messages"], desc=f"Tokenizing {key}",
        features=Features({"where": Value("string"), "input_ids": List(Value("int32")), "labels": List(Value("int32")),
                           "length": Value("int64"), "first_target": Value("int64")}),
    )
    return _filter(docs, report, max_seq_length, min_tokens), report, digest(docs_key, max_seq_length, min_tokens)


def _check_tokenizer(tokenizer, templates: set[str], source: str) -> None:
    """Fail early where the tokenizer cannot render or mask the conversations of `source`."""
    if "chat" in templates and not tokenizer.chat_template:
        raise DataError(f"{source} has \"messages\" records, but the tokenizer has no chat template; "
                        f"convert them to ShareGPT \"conversations\" for the Vicuna template")
    if "vicuna" in templates and tokenizer.eos_token is None:
        raise DataError(f"{source} needs the tokenizer's EOS token to end Vicuna replies, and it has none")
    offsets = "vicuna" in templates or ("chat" in templates and not _GENERATION_TAG.search(tokenizer.chat_template))
    if offsets and not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{source}: finding the assistant tokens needs a fast tokenizer (character offsets); "
                        f"load the model's tokenizer.json")


def _read_conversations(path: str, report: Report, format: str, split: str, streaming: bool):
    """(templates, JSON conversations, wheres, content hash) of the usable records."""
    templates, conversations, wheres, content = [], [], [], ContentHash()
    for where, record in iter_records(path, report, split=split, streaming=streaming):
        try:
            template, messages = to_messages(record, format)
            conversation = json.dumps(messages, ensure_ascii=False)
            payload = conversation.encode("utf-8")
        except _BadRecord as bad:
            report.bad(bad.reason, where, bad.detail, bad.hint)
            continue
        except UnicodeEncodeError as error:  # a lone surrogate, e.g. a "\ud800" escape in JSON
            report.bad("non-UTF-8", where, f"the text holds an unpaired surrogate ({error.reason})",
                       "fix the \\u escape in the source")
            continue
        if not messages:
            report.drop("empty", where, "empty conversation")
            continue
        content.add(where, template.encode() + payload)
        templates.append(template)
        conversations.append(conversation)
        wheres.append(where)
    return templates, conversations, wheres, content


def to_messages(record: Record, format: str) -> tuple[str, list[dict]]:
    """("vicuna" | "chat", [{"role", "content"}, ...]) of a record; _BadRecord if unusable."""
    if isinstance(record, str):
        raise _BadRecord("malformed conversation", "a .txt file is not a conversation",
                         "give .jsonl, .json or .parquet records to data.name = 'sft'")
    format = _detect(record) if format == "auto" else format
    messages = {"vicuna": _from_vicuna, "sharegpt": _from_sharegpt, "messages": _from_messages}[format](record)
    for index, message in enumerate(messages):
        if not isinstance(message["content"], str):
            raise _BadRecord("malformed conversation", f"turn {index} holds a {type(message['content']).__name__}, "
                             f"not text", "make every turn's text a string")
    if format != "messages" and any(m["role"] == "system" for m in messages[1:]):
        raise _BadRecord("malformed conversation", "a system turn after the first turn",
                         "the Vicuna template takes one system prompt, at the start")
    if messages and not any(m["role"] == "assistant" for m in messages):
        raise _BadRecord("no assistant reply", "the conversation has no assistant turn", "nothing to train on")
    return ("chat" if format == "messages" else "vicuna"), messages


def _detect(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "conversation" in record or "input" in record:
        return "vicuna"
    raise _BadRecord("missing field", f"no 'messages', 'conversations', 'conversation' or 'input' field "
                     f"(fields: {', '.join(map(repr, record)) or 'none'})", "set data.format or fix the record")


def _field(record: dict, name: str, where: str = ""):
    if name not in record:
        fields = ", ".join(map(repr, record)) or "none"
        raise _BadRecord("missing field", f"{where}no field {name!r} (fields: {fields})",
                         "fix the record or set data.format to its format")
    return record[name]


def _turns(record: dict, name: str) -> list[dict]:
    turns = _field(record, name)
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise _BadRecord("malformed conversation", f"field {name!r} is not a list of objects",
                         "make it a list of {...} turns")
    return turns


def _system(record: dict) -> list[dict]:
    return [{"role": "system", "content": record["system"]}] if record.get("system") else []


def _from_vicuna(record: dict) -> list[dict]:
    if "conversation" not in record:
        return _system(record) + [{"role": "user", "content": _field(record, "input")},
                                  {"role": "assistant", "content": _field(record, "output")}]
    messages = _system(record)
    for index, turn in enumerate(_turns(record, "conversation")):
        messages += [{"role": "user", "content": _field(turn, "human", f"turn {index}: ")},
                     {"role": "assistant", "content": _field(turn, "assistant", f"turn {index}: ")}]
    return messages


def _from_sharegpt(record: dict) -> list[dict]:
    messages = _system(record)
    for index, turn in enumerate(_turns(record, "conversations")):
        speaker = _field(turn, "from", f"turn {index}: ")
        if speaker not in SHAREGPT_ROLES:
            raise _BadRecord("malformed conversation", f"turn {index}: unknown speaker 'from': {speaker!r}",
                             f"use one of {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": _field(turn, "value", f"turn {index}: ")})
    return messages


def _from_messages(record: dict) -> list[dict]:
    messages = []
    for index, turn in enumerate(_turns(record, "messages")):
        role = _field(turn, "role", f"turn {index}: ")
        if role not in MESSAGE_ROLES:  # a chat template renders an unknown role as it likes: often as a reply
            raise _BadRecord("malformed conversation", f"turn {index}: unknown role 'role': {role!r}",
                             f"use one of {', '.join(MESSAGE_ROLES)}")
        messages.append({"role": role, "content": _field(turn, "content", f"turn {index}: ")})
    return messages


def render_vicuna(messages: list[dict], system_prompt: str, eos: str) -> tuple[str, list[tuple[int, int]]]:
    """Vicuna v1.1 text of a conversation, and the character spans of the targets (reply + eos)."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else system_prompt or VICUNA_SYSTEM
    text, spans = system + " ", []
    for message in messages:
        if message["role"] == "user":
            text += f"USER: {message['content']} "
        elif message["role"] == "assistant":
            text += "ASSISTANT: "
            start = len(text)
            text += message["content"] + eos
            spans.append((start, len(text)))
    return text, spans


def _chat_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Chat-template text and the character spans of the assistant replies, from prefixes."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:index + 1], tokenize=False).rstrip()
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError("the tokenizer's chat template does not render the start of a conversation as a prefix "
                            "of the whole, so the assistant tokens cannot be found; add {% generation %} tags to "
                            "the template or use ShareGPT \"conversations\" records (Vicuna template)")
        spans.append((len(before), len(through)))
    return text, spans


def _labels_from_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of `text`; labels = the id where the token overlaps a span, else -100."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    labels, span = [], 0
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        while span < len(spans) and spans[span][1] <= start:  # spans and tokens both run left to right
            span += 1
        inside = span < len(spans) and end > spans[span][0]
        labels.append(token if inside else -100)
    return list(encoded["input_ids"]), labels


def _encode(tokenizer, template: str, messages: list[dict], system_prompt: str) -> tuple[list[int], list[int]]:
    if template == "vicuna":
        return _labels_from_spans(tokenizer, *render_vicuna(messages, system_prompt, tokenizer.eos_token))
    if not _GENERATION_TAG.search(tokenizer.chat_template):
        return _labels_from_spans(tokenizer, *_chat_spans(tokenizer, messages))
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids = list(encoded["input_ids"])
    return ids, [token if mask else -100 for token, mask in zip(ids, encoded["assistant_masks"])]


def _tokenize(batch: dict, tokenizer, system_prompt: str, bos: list[int]) -> dict:
    out = {"input_ids": [], "labels": [], "length": [], "first_target": []}
    for template, conversation in zip(batch["template"], batch["messages"]):
        ids, labels = _encode(tokenizer, template, json.loads(conversation), system_prompt)
        if bos and ids[:1] != bos:
            ids, labels = bos + ids, [-100] + labels
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["first_target"].append(next((i for i, label in enumerate(labels) if label != -100), len(labels)))
    return out


def _filter(docs, report: Report, max_seq_length: int, min_tokens: int):
    """Drop conversations without a target within max_seq_length (each warned) or too short."""
    lengths = np.asarray(docs["length"], dtype=np.int64)
    first_target = np.asarray(docs["first_target"], dtype=np.int64)
    wheres = docs["where"]
    usable = first_target < np.minimum(lengths, max_seq_length)
    for index in np.flatnonzero(~usable):
        if first_target[index] == lengths[index]:
            report.drop("no target tokens", wheres[int(index)], "the rendered conversation has no assistant tokens",
                        "check that the chat template marks assistant replies")
        else:
            report.drop(f"no target within max_seq_length={max_seq_length}", wheres[int(index)],
                        f"the first assistant token is at position {first_target[index]}",
                        "raise data.max_seq_length or shorten the prompt")
    short = usable & (lengths < min_tokens)
    if short.any():
        report.drop_many(f"shorter than min_tokens={min_tokens}", int(short.sum()),
                         note=f"(longest had {int(lengths[short].max())} tokens)", hint="lower data.min_tokens")
    return keep(docs, report, usable & ~short)


def _shape(records, key: str, *, max_seq_length: int, cache_dir: str, num_proc: int):
    return cached_map(
        records, _truncate, stage="sft", key=digest(key, max_seq_length), cache_dir=cache_dir, num_proc=num_proc,
        fn_kwargs={"max_seq_length": max_seq_length}, remove_columns=records.column_names,
        features=sample_features(), desc="Shaping samples (sft)",
    )


def _truncate(batch: dict, max_seq_length: int) -> dict:
    input_ids = [ids[:max_seq_length] for ids in batch["input_ids"]]
    return {"input_ids": input_ids, "labels": [labels[:max_seq_length] for labels in batch["labels"]],
            "position_ids": [list(range(len(ids))) for ids in input_ids]}
