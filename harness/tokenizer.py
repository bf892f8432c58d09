"""Tokenizers: load one for a model, or build the offline byte-level one.

`model.tokenizer = "builtin:bytes"` gives a 260-token byte-level BPE with no merges: every
UTF-8 byte is one token, plus <s>, </s>, <pad>, <unk>. It needs no download, so the tiny
recipe and the tests run on a machine that reaches no hub.
"""
from __future__ import annotations

from pathlib import Path

BUILTIN_BYTES = "builtin:bytes"
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<unk>")
# A Vicuna-like template so chat-formatted data also works with the byte tokenizer.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% else %}ASSISTANT: {% generation %}{{ message['content'] }}</s>{% endgeneration %}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


def byte_tokenizer():
    """A PreTrainedTokenizerFast over raw UTF-8 bytes (vocab 260, ids 0-3 special)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({char: len(SPECIAL_TOKENS) + i for i, char in enumerate(sorted(alphabet))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(name_or_path: str, *, gguf_file: str | None = None):
    """Tokenizer from the byte builtin, a hub id, a local directory or a .gguf file.

    A tokenizer without a pad token gets one *without* growing the vocabulary: it reuses
    <unk> when present, else EOS (padding positions are masked from attention and loss).
    """
    if name_or_path == BUILTIN_BYTES:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if path.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    elif gguf_file:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer
