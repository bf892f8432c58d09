"""S2 and sliding-window attention for the head layouts of other families, against dense references.

Head counts: Qwen2.5-7B's 28 heads over 4 KV heads (7 per KV head), Qwen2.5-0.5B's 14 over 2,
Phi-3's MHA (32 over 32), 10 over 5 (an odd KV count), Gemma-3-1B's MQA (4 over 1), Llama-3-70B's
64 over 8. The split rule: a query head is shifted iff its KV head is in the second half of the
KV heads (ceil(H_kv / 2) stay unshifted); MQA splits the query heads, ceil(H / 2) unshifted.
"""
from __future__ import annotations

import math

import pytest
import torch

from harness.backends.attention import _cached_causal_attention
from harness.backends.sliding_window import sliding_window_attention
from harness.backends.s2 import _head_halves, shift_short_attention

HEADS = [(28, 4), (14, 2), (32, 32), (10, 5), (4, 1), (64, 8)]


def shifted(h: int, heads: int, kv_heads: int) -> bool:
    """Whether query head h is in the shifted half, by the rule in the module docstring."""
    if kv_heads == 1:
        return h >= math.ceil(heads / 2)
    return h // (heads // kv_heads) >= math.ceil(kv_heads / 2)


def dense_attention(q, k, v, allowed):
    """Softmax attention under allowed (B or 1, H, L, L_k) in float64: (B, H, L, D) -> (B, L, H, D)."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2)


def s2_allowed(heads, kv_heads, seq_len, group):
    """(1, H, L, L): causal, inside the head's group; the shifted heads' groups start G/2 later."""
    i = torch.arange(seq_len)
    masks = []
    for h in range(heads):
        ids = (i + (group // 2 if shifted(h, heads, kv_heads) else 0)) // group
        masks.append((i[None, :] <= i[:, None]) & (ids[None, :] == ids[:, None]))
    return torch.stack(masks)[None]


def qkv(heads, kv_heads, seq_len, batch=2, dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, seq_len, dim, generator=generator, dtype=torch.float64),
            torch.randn(batch, kv_heads, seq_len, dim, generator=generator, dtype=torch.float64),
            torch.randn(batch, kv_heads, seq_len, dim, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_a_query_head_stays_with_its_kv_head(heads, kv_heads):
    (q_first, kv_first), (q_second, kv_second) = _head_halves(heads, kv_heads)
    assert [h for h in range(heads) if not shifted(h, heads, kv_heads)] == list(range(q_first.stop))
    assert (q_first.start, q_second.stop) == (0, heads) and q_first.stop == q_second.start
    if kv_heads > 1:  # every query head of a KV head is on that KV head's side
        per_kv = heads // kv_heads
        assert q_first.stop == kv_first.stop * per_kv and (kv_second.start, kv_second.stop) == (kv_first.stop, kv_heads)


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_s2_matches_the_dense_reference_for_other_head_counts(heads, kv_heads, kernel):
    q, k, v = qkv(heads, kv_heads, seq_len=24)
    expected = dense_attention(q, k, v, s2_allowed(heads, kv_heads, 24, group=8))
    torch.testing.assert_close(shift_short_attention(q, k, v, 8, kernel=kernel), expected, rtol=1e-10, atol=1e-10)


def window_allowed(seq_len, window, valid=None, positions=None):
    """(B, 1, L, L): i reads j iff i - window < j <= i, same document (a position 0 starts one), j not
    padding; a padding row reads only itself."""
    i = torch.arange(seq_len)
    allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    if positions is not None:
        doc = (positions == 0).cumsum(-1)
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    if valid is not None:
        allowed = allowed & valid[:, None, :]
    return (allowed | torch.eye(seq_len, dtype=torch.bool))[:, None] if allowed.dim() == 3 else allowed[None, None]


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (28, 4), (4, 1)])
@pytest.mark.parametrize("window,seq_len", [(5, 23), (16, 40), (64, 40)])
def test_sliding_window_attention_matches_the_dense_reference(heads, kv_heads, window, seq_len, monkeypatch):
    monkeypatch.setattr("harness.backends.sliding_window.WINDOW_QUERY_BLOCK", 7)  # several blocks, a ragged last one
    q, k, v = qkv(heads, kv_heads, seq_len)
    expected = dense_attention(q, k, v, window_allowed(seq_len, window))
    torch.testing.assert_close(sliding_window_attention(q, k, v, window), expected, rtol=1e-10, atol=1e-10)


def test_sliding_window_attention_keeps_documents_apart_and_zeroes_padding(monkeypatch):
    monkeypatch.setattr("harness.backends.sliding_window.WINDOW_QUERY_BLOCK", 8)
    q, k, v = qkv(4, 2, 20)
    positions = torch.tensor([list(range(12)) + list(range(8)), list(range(20))])
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, 15:] = False  # right padding
    expected = dense_attention(q, k, v, window_allowed(20, 6, valid, positions)) * valid[:, :, None, None]
    out = sliding_window_attention(q, k, v, 6, attention_mask=valid, position_ids=positions)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_decoding_with_a_cache_reads_only_the_window():
    """The last 3 queries of 20 against a cache of 20 keys: each reads its own window of 6 keys."""
    q, k, v = qkv(4, 2, 20)
    expected = dense_attention(q, k, v, window_allowed(20, 6))[:, -3:]
    out = _cached_causal_attention(q[:, :, -3:], k, v, None, None, sliding_window=6)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
