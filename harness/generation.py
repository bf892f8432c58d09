"""Text generation with a loaded model: prompts, the window check, the KV cache's size, streaming.

    chat = Chat(tokenizer)                                # the chat template when the tokenizer has one
    result = chat.ask(model, "Summarise the book.", Sampling(max_new_tokens=200), on_text=print)
    result.text, result.prompt_tokens, result.cache_bytes

    ids = encode_prompt(tokenizer, text)                  # one prompt, templated or plain text
    check_window(context_window(model.config), len(ids))  # GenerationError past the extended window
    result = generate(model, tokenizer, ids, Sampling())  # greedy; what passkey retrieval calls too

Decoding is transformers' `generate` (KV cache, greedy or temperature/top-p sampling, EOS)
with a TextStreamer that hands each finished piece of text to `on_text`. A hand-written loop
would re-implement the cache handling and logits processors that `generate` gets right for
every model family, and passkey's greedy decoding was `generate` already, so moving it here
changes none of its answers. `generate` itself checks no window: passkey measures models past
theirs on purpose; the generate command and Chat check before they call it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from harness.errors import HarnessError
from harness.recipe import original_window

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
TextFn = Callable[[str], None]  # receives each piece of streamed text, in order


class GenerationError(HarnessError, ValueError):
    """A prompt or setting generation cannot honour: the message names both values."""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy decoding
    top_p: float = 1.0  # nucleus sampling, with temperature > 0

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return dict(do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)
        # top_k 0: only temperature and top-p shape the distribution, whatever generation_config says
        return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0,
                    max_new_tokens=self.max_new_tokens)


@dataclass(frozen=True)
class Generation:
    text: str  # the continuation, special tokens and any stop string left out
    token_ids: list[int]  # the new tokens, as generated
    prompt_tokens: int
    cache_tokens: int  # positions the KV cache holds at the end (prompt + new - 1)
    cache_bytes: int  # measured: the keys and values the cache holds


# --------------------------------------------------------------------------- window

@dataclass(frozen=True)
class Window:
    tokens: int  # the window the model's rope is set up for (extended, when it is)
    original: int  # the pretraining window
    rope: str  # "linear x2", "default"

    def describe(self) -> str:
        """e.g. "512 tokens (linear x2 rope over the original 256)"."""
        over = f" over the original {self.original:,}" if self.original != self.tokens else ""
        return f"{self.tokens:,} tokens ({self.rope} rope{over})"


def context_window(config) -> Window:
    """The window of a (rope-edited) model config, as harness.backends.position leaves it.

    Every scaled rope sets max_position_embeddings to the target, except dynamic NTK, which
    keeps the pretraining window there (transformers reads it as such): its window is that x factor.
    Any other stretch: the original window as the config records it (harness.recipe.original_window),
    or, where the stretch records none (linear, PI), the target / factor.
    """
    rope = dict(getattr(config, "rope_parameters", None) or {})
    kind, factor = rope.get("rope_type", "default"), float(rope.get("factor") or 1.0)
    if kind == "default" or factor == 1.0:
        return Window(config.max_position_embeddings, config.max_position_embeddings, kind)
    if kind == "dynamic":
        original = config.max_position_embeddings
        return Window(int(original * factor), original, f"{kind} x{factor:g}")
    recorded = rope.get("original_max_position_embeddings")
    original = original_window(config) if recorded else round(config.max_position_embeddings / factor)
    return Window(config.max_position_embeddings, original, f"{kind} x{factor:g}")


def check_window(window: Window, prompt_tokens: int) -> None:
    """GenerationError unless the prompt leaves room for at least one new token in the window."""
    if prompt_tokens >= window.tokens:
        where = "over" if prompt_tokens > window.tokens else "filling"
        raise GenerationError(
            f"the prompt is {prompt_tokens:,} tokens, {where} the model's window of {window.describe()}: shorten it "
            f"by at least {prompt_tokens - window.tokens + 1:,} tokens to leave room for an answer")


def new_token_budget(window: Window, prompt_tokens: int, max_new_tokens: int) -> int:
    """max_new_tokens, or fewer where the window ends first (past it rope positions were never trained)."""
    return min(max_new_tokens, window.tokens - prompt_tokens)


# --------------------------------------------------------------------------- KV cache

@dataclass(frozen=True)
class KvShape:
    layers: int
    kv_heads: int
    head_dim: int

    def bytes(self, tokens: int, dtype_bytes: int) -> int:
        """Keys and values of every layer for `tokens` positions, batch 1."""
        return 2 * self.layers * self.kv_heads * self.head_dim * tokens * dtype_bytes

    def formula(self, tokens: int, dtype_bytes: int) -> str:
        return (f"2 x {self.layers} layers x {self.kv_heads} KV heads x {self.head_dim} dims x {tokens:,} tokens x "
                f"{dtype_bytes} bytes")


def kv_shape(config) -> KvShape:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KvShape(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)


def cache_dtype(model) -> torch.dtype:
    """The dtype keys and values are cached in: the activations', which start at the embeddings
    (a 4-bit model's weights are uint8, its embeddings are in the compute dtype)."""
    return model.get_input_embeddings().weight.dtype


def cache_bytes(cache) -> int:
    """Bytes of the keys and values a transformers Cache holds, layer by layer."""
    return sum(tensor.nbytes for layer in cache.layers for tensor in (layer.keys, layer.values)
               if tensor is not None)


def format_bytes(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


# --------------------------------------------------------------------------- prompts

def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, text: str, *, template: bool = True, system: str | None = None) -> list[int]:
    """One prompt: a user turn of the chat template when the tokenizer has one (and `template`),
    else plain text for the model to continue (a system message then has nowhere to go)."""
    if template and has_template(tokenizer):
        return chat_ids(tokenizer, _with_system(system, [{"role": "user", "content": text}]))
    if system:
        raise GenerationError(f"--system {system!r} needs a chat template, and this prompt is plain text (the "
                              f"tokenizer has none, or --no-template): put it in the prompt")
    return tokenizer(text).input_ids


def chat_ids(tokenizer, messages: Sequence[Message]) -> list[int]:
    """A conversation ending in a user turn, through the chat template, ready for the answer."""
    encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                            return_dict=True)
    return list(encoded["input_ids"])


# Without a chat template a conversation is a plain transcript; the model's answer ends where
# it starts the user's next line.
USER, ASSISTANT = "User:", "Assistant:"
TRANSCRIPT_STOP = f"\n{USER}"


def transcript(messages: Sequence[Message]) -> str:
    """system\\n\\nUser: ...\\nAssistant: ...\\nUser: ...\\nAssistant:"""
    lines = []
    for message in messages:
        if message["role"] == "system":
            lines.append(message["content"] + "\n")
        else:
            lines.append(f"{USER if message['role'] == 'user' else ASSISTANT} {message['content']}")
    return "\n".join(lines + [ASSISTANT])


def _with_system(system: str | None, messages: list[Message]) -> list[Message]:
    return ([{"role": "system", "content": system}] if system else []) + messages


# --------------------------------------------------------------------------- generation

@torch.no_grad()
def generate(model, tokenizer, input_ids: list[int], sampling: Sampling = Sampling(), *,
             on_text: TextFn | None = None, stop: Sequence[str] = ()) -> Generation:
    """Continue `input_ids` (one sequence) with `model.generate`; stream the text to `on_text`.

    Decoding ends at EOS, after `sampling.max_new_tokens`, or once the text contains a `stop`
    string (left out of the text and the stream). Sampling draws from torch's global generator:
    seed it (torch.manual_seed) for repeatable samples.
    """
    ids = torch.tensor([input_ids], device=next(model.parameters()).device)  # (1, T)
    extra = {}
    if on_text is not None:
        extra["streamer"] = _stream(tokenizer, on_text, stop)
    if stop:
        extra["stopping_criteria"] = [_StopText(tokenizer, ids.shape[1], stop)]
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=_pad_id(tokenizer),
                            return_dict_in_generate=True, **sampling.generate_kwargs(), **extra)
    new = output.sequences[0, ids.shape[1]:].tolist()  # (new,)
    text = _cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)
    return Generation(text, new, len(input_ids), output.cache.get_seq_length(), cache_bytes(output.cache))


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.index(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that may begin a stop string: it waits for the next piece."""
    return max((n for s in stop for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)


def _stream(tokenizer, on_text: TextFn, stop: Sequence[str]):
    """transformers' TextStreamer, its finished pieces sent to `on_text` instead of print. It
    decodes in word-sized pieces, so no piece splits a character."""
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    streamer.on_finalized_text = _StopFilter(on_text, stop)
    return streamer


class _StopFilter:
    """Passes streamed text on, up to the first stop string; holds back what may start one."""

    def __init__(self, on_text: TextFn, stop: Sequence[str]):
        self.on_text, self.stop, self.pending, self.stopped = on_text, tuple(stop), "", False

    def __call__(self, text: str, stream_end: bool = False) -> None:
        if self.stopped:
            return
        self.pending += text
        cut = _cut_at_stop(self.pending, self.stop)
        self.stopped = len(cut) < len(self.pending)
        keep = 0 if self.stopped or stream_end else _held_back(cut, self.stop)
        ready, self.pending = cut[:len(cut) - keep], cut[len(cut) - keep:]
        if ready:
            self.on_text(ready)


class _StopText:
    """A stopping criterion: the continuation contains a stop string. (It decodes the whole
    continuation each step: a string can span many tokens, and answers are short.)"""

    def __init__(self, tokenizer, prompt_tokens: int, stop: Sequence[str]):
        self.tokenizer, self.prompt_tokens, self.stop = tokenizer, prompt_tokens, tuple(stop)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:  # input_ids (1, T + new)
        text = self.tokenizer.decode(input_ids[0, self.prompt_tokens:], skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.stop)], device=input_ids.device)


# --------------------------------------------------------------------------- chat

@dataclass
class Chat:
    """A conversation with history: every turn's prompt holds the earlier turns and answers.

    With a chat template (when the tokenizer has one and `template`) the messages go through
    it; otherwise through `transcript`, the answer stopping at the next "User:" line. When a
    prompt and its new tokens would outgrow the window, the oldest turns are dropped
    (`dropped_turns` counts them); a user message too long on its own is refused.
    """

    tokenizer: object
    template: bool = True
    system: str | None = None
    messages: list[Message] = field(default_factory=list)  # user and assistant turns, oldest first
    dropped_turns: int = 0

    @property
    def templated(self) -> bool:
        return self.template and has_template(self.tokenizer)

    def prompt_ids(self) -> list[int]:
        """The prompt of the next answer: system message, history, the pending user turn."""
        return self._encode(self.messages)

    def ask(self, model, user: str, sampling: Sampling = Sampling(), *, on_text: TextFn | None = None) -> Generation:
        window = context_window(model.config)
        turn = {"role": "user", "content": user}
        check_window(window, len(self._encode([turn])))  # too long on its own: refused, the history kept
        self.messages.append(turn)
        ids = self._fitted_prompt(window, sampling.max_new_tokens)
        budget = replace(sampling, max_new_tokens=new_token_budget(window, len(ids), sampling.max_new_tokens))
        result = generate(model, self.tokenizer, ids, budget, on_text=on_text,
                          stop=() if self.templated else (TRANSCRIPT_STOP,))
        self.messages.append({"role": "assistant", "content": result.text.strip()})
        return result

    def _encode(self, messages: Sequence[Message]) -> list[int]:
        messages = _with_system(self.system, list(messages))
        if self.templated:
            return chat_ids(self.tokenizer, messages)
        return self.tokenizer(transcript(messages)).input_ids

    def _fitted_prompt(self, window: Window, max_new_tokens: int) -> list[int]:
        ids = self.prompt_ids()
        while len(ids) + max_new_tokens > window.tokens and len(self.messages) > 1:
            del self.messages[:2]  # the oldest user turn and its answer
            self.dropped_turns += 1
            ids = self.prompt_ids()
        return ids
