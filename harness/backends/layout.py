"""Layout backends: which tokens of a training sample the model computes, at which positions.

    contiguous   the sample as the data gives it: data.max_seq_length tokens at positions 0..n-1
    pose         positional skip-wise training (Zhu et al., ICLR 2024): the sample is read at the
                 target length, and a window of data.max_seq_length of its tokens is computed,
                 in `chunks` pieces separated by random gaps; every token keeps its own
                 position, so the window's relative distances span the whole target

The contract of the kind: a layout other than `contiguous` reads samples of
position.target_length (`recipe.resolve` sets `resolved.sample_length` so) and returns windows
of at most data.max_seq_length tokens (`resolved.seq_len`: what S2's groups, the planner and
the tokens/s count see). The held-out samples of the long-context watch are read whole, with
contiguous positions, as the model is served. A layout applies to training samples only.

PoSE, here (the paper's chunks = 2 by default): a sample of n > window tokens is cut at
`chunks - 1` random points of the window (chunk lengths >= 1), and chunk i is read `offset_i` tokens
further into the text than contiguous reading would, the offsets drawn as sorted uniform points of
[0, n - window] (chunk 1 at 0), so the last kept token lies inside the sample (< target). The content
is the sample's own tokens at those positions (content matches position), and the first token of
each chunk that follows a skip is not a target (label -100): its predecessor in the window is not
its predecessor in the text. A sample of at most window tokens is kept whole. The window is one
causal text to the attention: transformers' own kernels, which would read a skip as the start of a
new sequence, get the mask of the harness's rule (harness.backends.attention.batch_mask).

Packed rows (data.mode = "pack"): positions restart at 0 at each document, which is how the
attention keeps documents apart; a chunk that starts inside a later document than the one the
previous chunk ended in gets that document's positions shifted to start at 0, so it is read as a
new document (its in-document distances kept), never joined to the previous one.

Draws are a pure function of (train.seed, epoch, sample index): a resumed run lays out every
sample as the interrupted one would have, and every rank draws its own samples alike.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from harness import registry


@dataclass(frozen=True)
class Layout:
    """`layout(sample, epoch, index)` -> the sample the model computes (a dict of lists)."""
    window: int  # tokens computed per sample (data.max_seq_length)
    chunks: int = 1  # 1: contiguous
    seed: int = 0

    def __call__(self, sample: dict, *, epoch: int, index: int) -> dict:
        if self.chunks == 1 or len(sample["input_ids"]) <= self.window:
            return sample
        rng = np.random.default_rng([self.seed, epoch, index])
        return skipped(sample, self.window, self.chunks, rng)

    def describe(self, sample_length: int) -> str:
        """One line for the run's start; "" for the contiguous layout."""
        if self.chunks == 1:
            return ""
        return (f"PoSE: each training sample is a {self.window}-token window of up to {sample_length} tokens, in "
                f"{self.chunks} chunks with random skips between them, at their own positions (layout.name = 'pose')")


def short_documents(document_lengths: list[int], target: int) -> str:
    """A warning when training documents are shorter than the target ("" when none is): positions restart
    at each document, so their skips never reach the target's distances."""
    short = sum(n < target for n in document_lengths)
    if not short:
        return ""
    return (f"PoSE: {short:,} of the {len(document_lengths):,} training documents are shorter than the target of "
            f"{target:,} tokens: positions restart at each document, so their skips stop at their own length. "
            f"Keep documents of the target's length (data.min_tokens = {target})")


@registry.register("layout", "contiguous", description="the sample as the data gives it, positions 0..n-1")
def contiguous_layout(*, window: int, seed: int) -> Layout:
    return Layout(window=window, seed=seed)


@registry.register("layout", "pose", description="PoSE: a short window of a target-length sample, positions skipped")
def pose_layout(*, window: int, seed: int, chunks: int = 2) -> Layout:
    return Layout(window=window, chunks=chunks, seed=seed)


def skipped(sample: dict, window: int, chunks: int, rng: np.random.Generator) -> dict:
    """`window` tokens of `sample` (n > window tokens) in `chunks` pieces with random gaps between them."""
    n = len(sample["input_ids"])
    cuts = np.sort(rng.choice(np.arange(1, window), size=chunks - 1, replace=False))  # chunk boundaries in the window
    gaps = np.sort(rng.integers(0, n - window, size=chunks - 1, endpoint=True))  # cumulative skip before chunk i
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [window]])
    offsets = np.concatenate([[0], gaps])
    kept = np.concatenate([np.arange(s + o, e + o) for s, e, o in zip(starts, ends, offsets)])  # (window,)
    positions = np.asarray(sample["position_ids"], dtype=np.int64)
    labels = np.asarray(sample["labels"], dtype=np.int64)[kept]
    labels[cuts[gaps > offsets[:-1]]] = -100  # a chunk after a skip: its window predecessor is not its text's
    return {**sample, "input_ids": np.asarray(sample["input_ids"])[kept].tolist(), "labels": labels.tolist(),
            "position_ids": _documents_kept_apart(positions, kept, cuts).tolist()}


def _documents_kept_apart(positions: np.ndarray, kept: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """positions[kept], where a chunk that starts inside a later document than the previous chunk's last
    token (a 0 position skipped over) restarts at 0 up to its next document start."""
    if not (positions[1:] == 0).any():  # one document: nothing to keep apart
        return positions[kept]
    document = np.cumsum(positions == 0)  # (n,) document index of each token of the sample
    out = positions[kept].copy()
    for cut in cuts:
        new_document = document[kept[cut]] != document[kept[cut - 1]]
        if new_document and out[cut] != 0:
            restart = np.flatnonzero(out[cut:] == 0)
            end = cut + (restart[0] if restart.size else len(out) - cut)
            out[cut:end] -= out[cut]
    return out


@registry.register_validator
def check_layout(recipe) -> None:
    """pose: a window shorter than the target, pretraining data (not conversations), a rope that reaches the target."""
    layout, window, target = recipe.layout, recipe.data.max_seq_length, recipe.position.target_length
    if layout.name == "contiguous":
        return
    if recipe.data.name == "sft":
        raise ValueError(f"layout.name = {layout.name!r} lays out long pretraining text; with data.name = 'sft' a "
                         f"conversation's answer needs its whole prompt: use layout.name = 'contiguous' for SFT")
    if not target:
        raise ValueError(f"layout.name = {layout.name!r} needs position.target_length: the length the skipped "
                         f"positions reach")
    if not 0 < window < target:
        shown = window or f"0 (= position.target_length, {target})"
        raise ValueError(f"layout.name = {layout.name!r} trains in a window shorter than the target, but "
                         f"data.max_seq_length = {shown} and position.target_length = {target}: set "
                         f"data.max_seq_length to the training window, e.g. {max(target // 4, 1)}")
    if not 2 <= layout.chunks <= window // 2:
        raise ValueError(f"layout.chunks = {layout.chunks} must be between 2 and {window // 2}, half the window's "
                         f"{window} tokens (1 chunk is layout.name = 'contiguous'; shorter chunks leave almost "
                         f"nothing to predict): use layout.chunks = 2, the paper's choice")
    _check_position(recipe, target)


def _check_position(recipe, target: int) -> None:
    """The rope must reach the target the skips train (refused without one), and stay one rope (warned)."""
    name, original = recipe.position.name, recipe.resolved.original_context
    if name == "none" and original and target > original:
        raise ValueError(f"layout.name = {recipe.layout.name!r} trains positions up to position.target_length = "
                         f"{target}, past the model's {original}-token context, but position.name = 'none' leaves "
                         f"the rope as it is: use position.name = 'yarn' (the default) or 'linear'")
    if name == "dynamic":
        logging.getLogger("harness").warning(
            "%sposition.name = 'dynamic' rescales the rope by each batch's largest position, which under "
            "layout.name = %r changes from batch to batch: the adapter trains on a moving rope. position.name = "
            "'yarn' (the default) or 'linear' keeps one", f"{recipe.source}: " if recipe.source else "",
            recipe.layout.name)
