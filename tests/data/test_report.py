"""The length table printed before training."""
from __future__ import annotations

import io

from rich.console import Console

from harness.data import DataStats
from harness.data.report import length_summary, print_length_stats


def test_length_summary():
    assert length_summary(list(range(1, 101)), truncated=10) == {
        "count": 100, "min": 1, "median": 50.5, "p95": 95.05, "max": 100, "truncated": 0.1}


def test_print_length_stats():
    stats = DataStats(source="books/", mode="truncate", max_seq_length=8192, records=14,
                      skipped={"empty": 2}, lengths={"train": [5000, 9000, 20000], "eval": [7000]},
                      truncated={"train": 2, "eval": 0}, samples={"train": 3, "eval": 1})
    out = io.StringIO()
    print_length_stats(stats, console=Console(file=out, width=120))
    text = out.getvalue()
    assert "books/ (truncate, samples of up to 8,192 tokens): tokens per document" in " ".join(text.split())
    assert "│ train │     3 │ 5,000 │  9,000 │ 18,900 │ 20,000 │     66.7% │       3 │" in text
    assert "skipped 2 of 14 records: 2 empty" in text
