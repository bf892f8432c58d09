"""Evaluation reports: rich tables, JSON files, matplotlib figures and a tokens/s progress bar.

Perplexity results are flat `PplRecord`s (one per model x protocol x length), the rows of
the JSON file `{"results": [{"model", "adapter", "protocol", "seq_len", "ppl", "tokens"}]}`.
Figures are drawn with the Agg backend: no display is needed.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from harness import atomic
from harness.evaluation.passkey import PasskeyResult
from harness.evaluation.perplexity import EvaluationError, PerplexityResult

PLOT_SUFFIXES = (".png", ".pdf", ".svg")  # what matplotlib writes without extra packages


@dataclass(frozen=True)
class PplRecord:
    model: str  # the label shown in tables and figures
    adapter: str | None
    protocol: str
    seq_len: int
    ppl: float
    tokens: int

    @classmethod
    def from_result(cls, model: str, adapter: str | None, result: PerplexityResult) -> "PplRecord":
        return cls(model, adapter, result.protocol, result.seq_len, result.ppl, result.tokens)


# --------------------------------------------------------------------------- perplexity

def _series(records: Sequence[PplRecord]) -> dict[str, dict[int, PplRecord]]:
    """Records by row name, then by seq_len; the protocol joins the name when several are shown."""
    several = len({r.protocol for r in records}) > 1
    series: dict[str, dict[int, PplRecord]] = {}
    for record in records:
        name = f"{record.model} [{record.protocol}]" if several else record.model
        series.setdefault(name, {})[record.seq_len] = record
    return series


def ppl_table(records: Sequence[PplRecord]) -> Table:
    """Perplexity, rows: models, columns: context lengths."""
    lengths = sorted({r.seq_len for r in records})
    protocols = ", ".join(sorted({r.protocol for r in records}))
    table = Table(title=f"Perplexity ({protocols})")
    table.add_column("model")
    for length in lengths:
        table.add_column(str(length), justify="right")
    for name, by_length in _series(records).items():
        table.add_row(name, *(f"{by_length[n].ppl:.3f}" if n in by_length else "-" for n in lengths))
    return table


def write_ppl_json(records: Sequence[PplRecord], path: str | Path) -> None:
    _write_json({"results": [asdict(r) for r in records]}, path)


def report_ppl(records: Sequence[PplRecord], *, json_path: Path | None = None, plot_path: Path | None = None) -> None:
    """The table on stdout; the JSON file and the plot where paths are given."""
    Console().print(ppl_table(records))
    if json_path:
        write_ppl_json(records, json_path)
    if plot_path:
        plot_ppl(records, plot_path)


def plot_ppl(records: Sequence[PplRecord], path: str | Path) -> None:
    """Perplexity against context length, one line per model (log2 x, log y: a zero-shot blow-up does
    not flatten the lines below it)."""
    from matplotlib.ticker import LogFormatter

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for name, by_length in _series(records).items():
        lengths = sorted(by_length)
        axes.plot(lengths, [by_length[n].ppl for n in lengths], marker="o", label=name)
    lengths = sorted({r.seq_len for r in records})
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")  # equal ratios, equal heights: 7.8 against 8.3 reads the same beside a 21
    axes.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # 10, not 10^1
    axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))  # 8, 9, 20
    axes.set_xticks(lengths, [str(n) for n in lengths])
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("perplexity (log scale)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    _save(figure, path)


# --------------------------------------------------------------------------- passkey

def passkey_table(result: PasskeyResult) -> Table:
    """Passkey accuracy, rows: prompt lengths, columns: key depths."""
    per_cell = len(result.trials) // (len(result.lengths) * len(result.depths))
    table = Table(title=f"Passkey retrieval accuracy ({per_cell} trials per cell)")
    table.add_column("length", justify="right")
    for depth in result.depths:
        table.add_column(f"depth {depth:g}", justify="right")
    for length, row in zip(result.lengths, result.accuracy()):
        table.add_row(str(length), *(f"{value:.0%}" for value in row))
    return table


def write_passkey_json(result: PasskeyResult, path: str | Path) -> None:
    _write_json(result.to_dict(), path)


def _write_json(content: dict, path: str | Path) -> None:
    """Atomically (a file that was there stays whole until the new one is complete), its folder made."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(content, indent=2) + "\n")


def plot_passkey(result: PasskeyResult, path: str | Path) -> None:
    """Heatmap of accuracy: lengths down, depths across, each cell labelled."""
    plt = _pyplot()
    accuracy = result.accuracy()  # [lengths][depths]
    figure, axes = plt.subplots(figsize=(1.2 * len(result.depths) + 2.5, 0.5 * len(result.lengths) + 2))
    image = axes.imshow(accuracy, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    axes.set_xticks(range(len(result.depths)), [f"{d:g}" for d in result.depths])
    axes.set_yticks(range(len(result.lengths)), [str(n) for n in result.lengths])
    axes.set_xlabel("key depth")
    axes.set_ylabel("prompt length (tokens)")
    for i, row in enumerate(accuracy):
        for j, value in enumerate(row):
            axes.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes, label="accuracy")
    _save(figure, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(flag: str, path: Path) -> None:
    """A figure's format comes from its suffix: one matplotlib cannot write fails before any scoring."""
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise EvaluationError(f"{flag} {path}: {path.suffix or 'no suffix'} is not a figure format; end the name "
                              f"in {', '.join(PLOT_SUFFIXES)}")


def _save(figure, path: str | Path) -> None:
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)


# --------------------------------------------------------------------------- progress

class _RateColumn(ProgressColumn):
    """Items per second, e.g. '1,234 tok/s'."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"? {self.unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(description: str, unit: str = "tok", console: Console | None = None) -> Iterator:
    """A rich bar on stderr; yields the `progress(done, total)` callback the evaluators take."""
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), _RateColumn(unit),
               TimeRemainingColumn())
    with Progress(*columns, console=console or Console(stderr=True)) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
