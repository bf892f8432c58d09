"""Token ids of very long texts, tokenized piece by piece.

A fast tokenizer holds about 200 bytes per character of its input while it works (a 10 MB
one-line book peaked at 2 GB), so a text longer than `PIECE_CHARS` is cut into pieces of about
that size, each tokenized alone, and the ids concatenated. Cuts go at a single space between
two non-space characters, where byte-level BPE tokenizers (GPT-2, LLaMA-3, Qwen, SmolLM2) never
merge across: there the pieces' tokens are the whole text's.

Other tokenizers differ at a cut (SentencePiece ones prepend a space to every piece), so the cut
is checked, never assumed: each one is tokenized in a window of about `CHECK_CHARS` either side,
whole and as two pieces, and both ways of cutting are tried, the space starting the next piece
or dropped (for tokenizers that add it back). Where neither gives the window's own tokens, the
text is tokenized whole, as before, with a warning that it takes memory.
"""
from __future__ import annotations

import re

import numpy as np

from harness.data import logger

PIECE_CHARS = 1 << 20
CHECK_CHARS = 2048
_SAFE_SPACE = re.compile(r"(?<=\S) (?=\S)")


def encode_long(tokenizer, text: str, piece_chars: int = PIECE_CHARS) -> np.ndarray:
    """The token ids of `text` (no special tokens, int32), the same as tokenizing it whole."""
    cuts = _cuts(text, piece_chars)
    skip = _checked_skip(tokenizer, text, cuts, piece_chars)
    if skip is None:
        logger.warning("tokenizing a text of %s characters whole: this tokenizer's tokens differ where it is cut "
                       "at a space, so it cannot be cut into pieces (it takes about %.1f GB while it works)",
                       f"{len(text):,}", len(text) * 200 / 1e9)
        return np.asarray(_encode(tokenizer, text), dtype=np.int32)
    pieces, start = [], 0
    for cut in [*cuts, len(text)]:
        pieces.append(np.asarray(_encode(tokenizer, text[start:cut]), dtype=np.int32))  # 4 bytes a token, not 36
        start = cut + skip
    return np.concatenate(pieces)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _cuts(text: str, piece_chars: int) -> list[int]:
    """Positions of safe spaces about `piece_chars` apart (a space-free stretch is never cut)."""
    cuts, last = [], 0
    while len(text) - last > piece_chars:
        cut = _safe_space_near(text, last + piece_chars, low=last + 1)
        if cut is None:
            break
        cuts.append(cut)
        last = cut
    return cuts


def _safe_space_near(text: str, position: int, *, low: int) -> int | None:
    """The last safe space at or before `position` (not before `low`), else the first after it."""
    before = text.rfind(" ", low, position + 1)
    while before >= low and not _SAFE_SPACE.match(text, before):
        before = text.rfind(" ", low, before)
    if before >= low:
        return before
    found = _SAFE_SPACE.search(text, position)
    return found.start() if found else None


def _checked_skip(tokenizer, text: str, cuts: list[int], piece_chars: int) -> int | None:
    """0 (the space starts the next piece) or 1 (it is dropped) where every cut gives the tokens of
    its window; None where neither way does."""
    for skip in (0, 1):
        if all(_cut_holds(tokenizer, text, cut, skip, piece_chars) for cut in cuts):
            return skip
    return None


def _cut_holds(tokenizer, text: str, cut: int, skip: int, piece_chars: int) -> bool:
    window = min(CHECK_CHARS, piece_chars // 2)
    left = _safe_space_near(text, cut - window, low=max(cut - 2 * window, 0))
    right = _safe_space_near(text, cut + window, low=cut + 1)
    left = 0 if left is None or left >= cut else left + skip
    right = len(text) if right is None else right
    whole = _encode(tokenizer, text[left:right])
    return whole == _encode(tokenizer, text[left:cut]) + _encode(tokenizer, text[cut + skip:right])
