"""The length table shown before training: how long the records are and how many were cut."""
from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table

from harness.data import DataStats


def length_summary(lengths: list[int], truncated: int) -> dict:
    """count, min, median, p95 and max tokens of `lengths`, and the share truncated."""
    values = np.asarray(lengths, dtype=np.int64)
    if not values.size:
        return {"count": 0, "min": 0, "median": 0, "p95": 0, "max": 0, "truncated": 0.0}
    return {"count": int(values.size), "min": int(values.min()), "median": float(np.median(values)),
            "p95": float(np.percentile(values, 95)), "max": int(values.max()), "truncated": truncated / values.size}


def length_table(stats: DataStats) -> Table:
    noun = "conversations" if stats.mode == "sft" else "chunks" if stats.mode == "tokens" else "documents"
    table = Table(title=f"Data: {stats.source} ({stats.mode}, samples of up to {stats.max_seq_length:,} tokens): "
                        f"tokens per {noun[:-1]}")
    for column in ("split", "count", "min", "median", "p95", "max", "truncated", "samples"):
        table.add_column(column, justify="left" if column == "split" else "right", min_width=len(column))
    for split, lengths in stats.lengths.items():
        row = length_summary(lengths, stats.truncated.get(split, 0))
        table.add_row(split, f"{row['count']:,}", f"{row['min']:,}", f"{row['median']:,.0f}", f"{row['p95']:,.0f}",
                      f"{row['max']:,}", f"{row['truncated']:.1%}", f"{stats.samples.get(split, 0):,}")
    if stats.skipped:
        skipped = ", ".join(f"{count:,} {reason}" for reason, count in stats.skipped.items())
        table.caption = f"skipped {sum(stats.skipped.values()):,} of {stats.records:,} records: {skipped}"
    return table


def print_length_stats(stats: DataStats, console: Console | None = None) -> None:
    """Print the length table (count, min/median/p95/max tokens, share truncated) per split."""
    (console or Console()).print(length_table(stats))
