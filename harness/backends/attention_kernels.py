"""Attention kernels beside S2 and the token rules every harness kernel follows.

Shapes: B batch, L sequence length, H query heads, H_kv key/value heads, D head dim.

    attention_mask (B, L): 1/True = token, 0/False = padding; None = no padding
    position_ids (B, L) or (1, L): a new document starts wherever the position is 0

`tokens_of` reads both into `Tokens` (which keys a query may read: same document, not padding),
and `zero_padding` zeroes the output rows of padding queries; S2 (harness.backends.s2) and
`sliding_window_attention` (Mistral's and Gemma's local layers) share them. Pure tensor
functions: no engine, no transformers.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Tokens(NamedTuple):
    """Which keys each query may read, from the padding mask and the documents of position_ids."""
    valid: torch.Tensor  # (B, L) bool, False for padding
    doc: torch.Tensor  # (B, L) long, document index within the row
    plain: bool  # no padding and one document per row: plain causal masks suffice


def tokens_of(attention_mask, position_ids, query) -> Tokens:
    """attention_mask (B, L) and position_ids (B, L) or (1, L), checked against query (B, H, L, D)."""
    batch, seq_len, device = query.shape[0], query.shape[2], query.device
    valid = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    if attention_mask is not None:
        if attention_mask.shape != (batch, seq_len):
            raise ValueError(f"attention_mask must have shape (B, L) = {(batch, seq_len)}, "
                             f"got {tuple(attention_mask.shape)}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0/1 (or bool) values, got "
                             f"{attention_mask.unique().tolist()}")
        valid = attention_mask.to(device=device, dtype=torch.bool)
    doc = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seq_len:
            raise ValueError(f"position_ids must have shape (B, L) = {(batch, seq_len)} or (1, L), "
                             f"got {tuple(position_ids.shape)}")
        doc = (position_ids.to(device).expand(batch, seq_len) == 0).cumsum(dim=1)  # +1 at each restart
    plain = bool(valid.all()) and bool((doc == doc[:, :1]).all())
    return Tokens(valid, doc, plain)


def zero_padding(out, tokens: Tokens):
    """out (B, L, H, D) with padding query rows set to zero."""
    return out if tokens.plain else out * tokens.valid[:, :, None, None].to(out.dtype)


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
