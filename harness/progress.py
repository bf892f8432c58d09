"""What a run shows while it trains: the progress bar (or plain lines) and the peak memory it reports."""
from __future__ import annotations

import resource
import time

import torch
from rich.console import Console


def peak_memory_gib() -> float:
    """Peak GPU memory allocated, or the process's peak RSS on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class Progress:
    """A rich progress bar: step, loss, lr, tokens/s, peak memory, the last evaluation and ETA. Where the
    output is no terminal (CI logs, nohup, | tee) the bar would show nothing until the end: a plain
    line every `plain_every_s` seconds instead, and at the last step."""

    def __init__(self, console: Console, total: int, start: int, plain_every_s: float = 30.0):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.console, self.total, self.plain_every_s = console, total, plain_every_s
        self.plain = not console.is_terminal
        self.last_plain = time.monotonic()
        self.bar = RichProgress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(), console=console, disable=console.quiet or self.plain,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, stats="")
        self.eval = ""  # the last evaluation, shown after the step's figures

    def __enter__(self):
        self.bar.__enter__()
        return self

    def update(self, step: int, record: dict) -> None:
        stats = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s  "
                 f"mem {record['peak_memory_gib']:.2f} GiB{self.eval}")
        self.bar.update(self.task, completed=step, stats=stats)
        if self.plain and (step == self.total or time.monotonic() - self.last_plain >= self.plain_every_s):
            self.last_plain = time.monotonic()
            self.console.print(f"train {step}/{self.total}  {stats}", soft_wrap=True)

    def show_eval(self, record: dict) -> None:
        window = f" / {record['eval_ppl_window']:.2f}" if "eval_ppl_window" in record else ""
        self.eval = f"  eval ppl {record['eval_ppl']:.2f}{window}"

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)
