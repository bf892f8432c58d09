"""The token rules every harness attention kernel follows: padding and documents.

Shapes: B batch, L sequence length, H query heads, D head dim.

    attention_mask (B, L): 1/True = token, 0/False = padding; None = no padding
    position_ids (B, L) or (1, L): a new document starts wherever the position is 0

`tokens_of` reads both into `Tokens` (which keys a query may read: same document, not padding),
and `zero_padding` zeroes the output rows of padding queries; S2 (harness.backends.s2) and
sliding-window attention (harness.backends.sliding_window) share them. Pure tensor functions: no
engine, no transformers.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


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
