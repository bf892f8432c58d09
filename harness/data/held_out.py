"""Held-out samples taken from the training data, for the long-context watch of every run.

A recipe with neither data.eval_path nor data.eval_fraction still gets its held-out
perplexity at the target: train.eval_holdout samples (4 by default) are taken out of the
shaped training samples before any step, never trained on. Samples of the full training
length come first (the watch reads the target length); where fewer are that long, the longest
of the candidates looked at. Seeded, so a resumed run holds out the same ones (their indices
are part of its data fingerprint).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from harness.data import DataSplits

CANDIDATES = 256  # samples looked at for target-length ones: reading every length of a large set costs minutes
MIN_LEFT_SHARE = 10  # hold out at most 1/10 of the samples: a small data set keeps most of itself for training


class Subset:
    """A map-style view of `samples` at `indices`: len() and [i], as the loop reads data."""

    def __init__(self, samples: Any, indices: Sequence[int]):
        self.samples, self.indices = samples, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        return self.samples[self.indices[position]]


def choose(samples: Any, count: int, length: int, seed: int) -> list[int]:
    """Indices of `count` samples (at most 1/MIN_LEFT_SHARE of them): full-length ones first, in a
    seeded random order over the first CANDIDATES of a permutation."""
    count = min(count, len(samples) // MIN_LEFT_SHARE)
    if count <= 0:
        return []
    order = np.random.default_rng(seed).permutation(len(samples))[:CANDIDATES]
    lengths = [len(samples[int(i)]["input_ids"]) for i in order]
    ranked = sorted(range(len(order)), key=lambda k: -min(lengths[k], length))  # stable: the permutation breaks ties
    return sorted(int(order[k]) for k in ranked[:count])


def hold_out(splits: DataSplits, indices: list[int]) -> DataSplits:
    """The splits with `indices` of the training samples moved to eval."""
    held = set(indices)
    kept = [i for i in range(len(splits.train)) if i not in held]
    return dataclasses.replace(splits, train=Subset(splits.train, kept), eval=Subset(splits.train, indices),
                               held_out=list(indices))
