"""Training data: read long documents or conversations, tokenize them, and shape samples.

Three data backends (registered in `harness.data.backends`) turn the recipe's `[data]` table
into a `DataSplits`:

- ``pretrain``: long documents, one per sample cut to max_seq_length (``truncate``, as in the
  paper) or concatenated into full-length samples (``pack``).
- ``sft``: conversations (Vicuna v1.1, ShareGPT or chat ``messages``) with the loss on the
  assistant tokens only.
- ``tokens``: a LongLoRA-style ``.bin`` file of token ids, cut into max_seq_length chunks.

Every sample is a dict of equal-length lists: ``input_ids``, ``labels`` (-100 = no loss; the
model shifts labels internally, so ``labels[t]`` is the target of the logits at ``t - 1``)
and ``position_ids``. `harness.data.collate.Collator` batches samples and
`harness.data.order.ResumableOrder` decides which samples each step reads.

Bad input is never dropped silently: each dropped record is counted and warned about through
the ``harness.data`` logger with its file:line, and the counts end up in `DataStats`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from harness.errors import HarnessError

logger = logging.getLogger("harness.data")


class DataError(HarnessError, ValueError):
    """The data cannot be used as configured; the message names the input and the fix."""


@dataclass
class DataStats:
    """Counts for the pre-training report (`harness.data.report.print_length_stats`)."""

    source: str                 # data.path as given
    mode: str                   # "truncate" | "pack" | "sft" | "tokens"
    max_seq_length: int
    records: int = 0            # documents or conversations read, bad ones included
    skipped: dict[str, int] = field(default_factory=dict)      # reason -> records dropped
    lengths: dict[str, list[int]] = field(default_factory=dict)  # split -> tokens per kept record
    truncated: dict[str, int] = field(default_factory=dict)    # split -> records cut at max_seq_length
    samples: dict[str, int] = field(default_factory=dict)      # split -> training samples built


@dataclass
class DataSplits:
    """What a data backend returns: map-style datasets of sample dicts, and their stats."""

    train: Any                  # torch Dataset or datasets.Dataset
    eval: Any | None
    stats: DataStats
    held_out: list[int] = field(default_factory=list)  # training samples moved to eval (harness.data.held_out)


__all__ = ["DataError", "DataSplits", "DataStats", "logger"]
