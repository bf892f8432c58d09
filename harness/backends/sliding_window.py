"""Sliding-window attention: the windowed layers (Mistral, Gemma's local layers) where the s2 backend
runs full attention (evaluation, inference).

Shapes: B batch, L sequence length, H query heads, H_kv key/value heads, D head dim. Padding and
documents follow the same rules as S2's (harness.backends.token_masks). A pure tensor function: no
engine, no transformers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.backends.token_masks import tokens_of, zero_padding

WINDOW_QUERY_BLOCK = 1024  # sliding-window attention: queries per SDPA call (each reads its block + W keys)


def sliding_window_attention(query, key, value, window: int, attention_mask=None, position_ids=None, scaling=None):
    """Causal attention inside a sliding window, with S2's padding and document rules :
    token i reads j iff i - window < j <= i (transformers' sliding_window_overlay), both in one document,
    j not padding. query (B, H, L, D), key/value (B, H_kv, L, D) -> (B, L, H, D). Queries run in blocks
    of WINDOW_QUERY_BLOCK against the window - 1 keys before the block and the block's own: no (L, L) mask."""
    tokens = tokens_of(attention_mask, position_ids, query)
    heads, seq_len = query.shape[1], query.shape[2]
    repeat = heads // key.shape[1]  # masked SDPA: repeat KV heads, as transformers' sdpa does
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    outs = []
    for start in range(0, seq_len, WINDOW_QUERY_BLOCK):
        stop, first = min(start + WINDOW_QUERY_BLOCK, seq_len), max(0, start - window + 1)
        q_pos = torch.arange(start, stop, device=query.device)[:, None]  # (q, 1)
        k_pos = torch.arange(first, stop, device=query.device)[None, :]  # (1, k)
        allowed = (k_pos <= q_pos) & (k_pos > q_pos - window)  # (q, k)
        allowed = allowed & (tokens.doc[:, start:stop, None] == tokens.doc[:, None, first:stop])
        allowed = (allowed & tokens.valid[:, None, first:stop]) | (k_pos == q_pos)  # padding rows: never empty
        k = key[:, :, first:stop].repeat_interleave(repeat, dim=1)
        v = value[:, :, first:stop].repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(query[:, :, start:stop], k, v, attn_mask=allowed[:, None], scale=scaling)
        outs.append(out.transpose(1, 2))  # (B, q, H, D)
    return zero_padding(torch.cat(outs, dim=1), tokens)
