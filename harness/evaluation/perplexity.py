"""Perplexity of a causal LM over one long token sequence, under two window protocols.

Both protocols cut the sequence into windows of at most L = `seq_len` tokens. A window is
fed to the model whole, and scores some of its own tokens: token t is predicted by the
logits at t - 1, so each scored token has at most L - 1 tokens of context and a window's
first token is never scored by it. Perplexity is exp(sum of token NLLs / number of scored
tokens): averaged per token, never per window or per batch.

- `strided` (Hugging Face's "perplexity of fixed-length models", done exactly): windows
  start at 0, S, 2S, ... (stride S <= L - 1, default L - 1); each scores only the tokens no
  earlier window scored, so every token but the very first is scored exactly once. With
  S = L - 1 windows share only the one token the first prediction needs as context.
- `longlora` (LongLoRA's eval.py, which LongQLoRA's README uses for its paper numbers):
  windows of exactly L tokens starting at every i in range(0, N - L, W) (W =
  `sliding_window`, default 256) except the last such i; each scores its last L - 1 tokens
  (their loss is the model's own loss with labels = input_ids). Overlapping windows score
  tokens again, each time with a different context.

`data` is any 1-D sequence of token ids: numpy array, np.memmap (read one window at a time),
torch tensor or list.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from harness.errors import HarnessError

PROTOCOLS = ("strided", "longlora")
# Sequence positions whose fp32 log-probabilities are held at once: 2048 x a 32k vocab is
# 256 MiB, so an 8k-token window never holds a second full-size fp32 copy of its logits.
_SCORE_CHUNK = 2048

Progress = Callable[[int, int], None]  # (scored tokens done, scored tokens in all)


class EvaluationError(HarnessError, ValueError):
    """Arguments that cannot describe an evaluation (the message names them)."""


@dataclass(frozen=True)
class Window:
    """Model input data[begin:end]; the tokens data[score_from:end] are scored."""

    begin: int
    end: int
    score_from: int  # begin < score_from <= end: a scored token needs a token of context

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def scored(self) -> int:
        return self.end - self.score_from


@dataclass(frozen=True)
class PerplexityResult:
    protocol: str
    seq_len: int
    nll_sum: float  # natural-log NLL summed over every scored token
    tokens: int  # scored tokens
    windows: int

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


# --------------------------------------------------------------------------- windows

def strided_windows(n: int, seq_len: int, stride: int | None = None) -> list[Window]:
    """Windows over n tokens that score tokens 1..n-1 exactly once, each window <= seq_len long."""
    _check_seq_len(seq_len)
    stride = seq_len - 1 if stride is None else stride
    _check_positive(stride=stride)
    if stride > seq_len - 1:
        raise EvaluationError(
            f"stride={stride} is larger than seq_len - 1 = {seq_len - 1}: a window of {seq_len} tokens "
            f"scores at most its last {seq_len - 1}, so tokens would be skipped"
        )
    _check_fits(n, seq_len, needed=seq_len, what="strided protocol")
    windows, scored_to = [], 1  # token 0 has no context: scoring starts at token 1
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        windows.append(Window(begin, end, scored_to))
        scored_to = end
        if end == n:
            break
    return windows


def longlora_windows(n: int, seq_len: int, sliding_window: int = 256) -> list[Window]:
    """LongLoRA eval.py's windows: starts range(0, n - seq_len, sliding_window) minus the last."""
    _check_seq_len(seq_len)
    _check_positive(sliding_window=sliding_window)
    # Their get_as_batch pops the last start, so two starts are needed for one window:
    # n - seq_len > sliding_window.
    _check_fits(n, seq_len, needed=seq_len + sliding_window + 1,
                what=f"longlora protocol with sliding_window={sliding_window}")
    starts = list(range(0, n - seq_len, sliding_window))[:-1]
    return [Window(i, i + seq_len, i + 1) for i in starts]


def _check_seq_len(seq_len: int) -> None:
    _check_positive(seq_len=seq_len)
    if seq_len < 2:
        raise EvaluationError(f"seq_len={seq_len}: a window needs at least 2 tokens to score one")


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise EvaluationError(f"{name} must be a positive integer, got {value}")


def _check_fits(n: int, seq_len: int, *, needed: int, what: str) -> None:
    if n < needed:
        raise EvaluationError(
            f"seq_len={seq_len} does not fit the data: the {what} needs at least {needed} tokens, "
            f"the data has {n}"
        )


# --------------------------------------------------------------------------- scoring

def strided_perplexity(model, data, seq_len: int, *, stride: int | None = None, max_tokens: int | None = None,
                       batch_size: int = 1, progress: Progress | None = None) -> PerplexityResult:
    ids = _token_ids(data, max_tokens)
    windows = strided_windows(len(ids), seq_len, stride)
    return _result("strided", seq_len, *score_windows(model, ids, windows, batch_size, progress))


def longlora_perplexity(model, data, seq_len: int, *, sliding_window: int = 256, max_tokens: int | None = None,
                        batch_size: int = 1, progress: Progress | None = None) -> PerplexityResult:
    ids = _token_ids(data, max_tokens)
    windows = longlora_windows(len(ids), seq_len, sliding_window)
    return _result("longlora", seq_len, *score_windows(model, ids, windows, batch_size, progress))


def evaluate_perplexity(model, data, seq_len: int, *, protocol: str = "strided", stride: int | None = None,
                        sliding_window: int = 256, max_tokens: int | None = None, batch_size: int = 1,
                        progress: Progress | None = None) -> PerplexityResult:
    """Dispatch to `strided_perplexity` or `longlora_perplexity` by protocol name."""
    common = dict(max_tokens=max_tokens, batch_size=batch_size, progress=progress)
    if protocol == "strided":
        return strided_perplexity(model, data, seq_len, stride=stride, **common)
    if protocol == "longlora":
        return longlora_perplexity(model, data, seq_len, sliding_window=sliding_window, **common)
    raise EvaluationError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")


def score_windows(model, ids: np.ndarray, windows: Sequence[Window], batch_size: int = 1,
                  progress: Progress | None = None) -> tuple[float, int, int]:
    """(NLL sum, scored tokens, windows) of the model over the windows of token ids `ids`."""
    _check_positive(batch_size=batch_size)
    total_tokens = sum(w.scored for w in windows)
    nll_sum, done = 0.0, 0
    for batch in _batches(windows, batch_size):
        nll_sum += _score_batch(model, ids, batch)
        done += sum(w.scored for w in batch)
        if progress is not None:
            progress(done, total_tokens)
    return nll_sum, total_tokens, len(windows)


def _result(protocol: str, seq_len: int, nll_sum: float, tokens: int, windows: int) -> PerplexityResult:
    return PerplexityResult(protocol=protocol, seq_len=seq_len, nll_sum=nll_sum, tokens=tokens, windows=windows)


def _token_ids(data, max_tokens: int | None) -> np.ndarray:
    """A 1-D integer array view of data (a memmap stays on disk), cut to max_tokens."""
    _check_positive(max_tokens=max_tokens)
    ids = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise EvaluationError(f"data must be a 1-D sequence of token ids, got shape {ids.shape} of {ids.dtype}")
    return ids[:max_tokens]


def _batches(windows: Sequence[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of equal length, batch_size at most (only a final one is shorter)."""
    batch: list[Window] = []
    for window in windows:
        if batch and (len(batch) == batch_size or window.length != batch[0].length):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


@torch.no_grad()
def _score_batch(model, ids: np.ndarray, batch: list[Window]) -> float:
    """Summed NLL of the scored tokens of equal-length windows, computed in fp32 or wider."""
    device = _input_device(model)
    rows = [np.asarray(ids[w.begin:w.end], dtype=np.int64) for w in batch]
    input_ids = torch.from_numpy(np.stack(rows)).to(device)  # [B, T]
    logits = _forward(model, input_ids)  # [B, T, V], model dtype
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for row, window in enumerate(batch):
        first = window.score_from - window.begin  # position of the first scored token
        # Token t is predicted by the logits at t - 1.
        for start in range(first, window.length, _SCORE_CHUNK):
            stop = min(start + _SCORE_CHUNK, window.length)
            chunk = logits[row, start - 1:stop - 1]  # [n, V]
            # fp32 at least: half-precision log_softmax over a large vocab loses digits.
            log_probs = torch.log_softmax(chunk.to(torch.promote_types(chunk.dtype, torch.float32)), dim=-1)
            targets = input_ids[row, start:stop].to(logits.device)  # [n]
            total -= log_probs.gather(-1, targets[:, None]).double().sum()
    return total.item()


def _forward(model, input_ids: torch.Tensor) -> torch.Tensor:
    # Hugging Face models would also build a KV cache (GBs for a long window) never reused here.
    extra = {"use_cache": False} if hasattr(model, "config") else {}
    return model(input_ids=input_ids, **extra).logits


def _input_device(model) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
