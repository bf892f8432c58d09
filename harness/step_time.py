"""A warning when an optimizer step is on course to take far longer than the run's own steps.

The loop reports each micro-batch; the step's time is projected from the micro-batches done so
far (elapsed / done x grad_accum). It warns once per step when the projection is more than
`FACTOR` times the median of the run's recent steps (and at least `MIN_SECONDS`): swapping,
another job on the machine, or a setting that makes a step huge. The first step has nothing to
compare with, so it warns only past `FIRST_STEP_SECONDS` (train.grad_accum = 100000000 projects
to weeks).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

FACTOR = 10.0
MIN_SECONDS = 60.0
FIRST_STEP_SECONDS = 3600.0
RECENT = 20  # steps the median is taken over


class StepTimeWatch:
    def __init__(self, grad_accum: int, clock: Callable[[], float] = time.perf_counter):
        self.grad_accum, self.clock = grad_accum, clock
        self.steps: list[float] = []  # seconds of the finished steps, the last RECENT
        self.started, self.warned = 0.0, False

    def start(self) -> None:
        self.started, self.warned = self.clock(), False

    def micro_batch_done(self, done: int, step: int) -> str | None:
        """The warning for step `step` (1-based) after `done` of its micro-batches, once; else None."""
        elapsed = self.clock() - self.started
        projected = elapsed / done * self.grad_accum
        usual = statistics.median(self.steps) if self.steps else None
        limit = max(MIN_SECONDS, FACTOR * usual) if usual is not None else FIRST_STEP_SECONDS
        if self.warned or projected <= limit:
            return None
        self.warned = True
        pace = f"{self.grad_accum:,} micro-batches of {format_seconds(elapsed / done)}"
        against = (f", {projected / usual:.0f}x the median of the run's recent steps ({format_seconds(usual)}): "
                   f"is the machine swapping or busy with another job?") if usual else (
                   f"; check train.grad_accum ({self.grad_accum:,}) and train.micro_batch_size")
        return f"step {step} will take about {format_seconds(projected)} at this pace ({pace}){against}"

    def finish(self) -> None:
        self.steps = [*self.steps[-(RECENT - 1):], self.clock() - self.started]


def format_seconds(seconds: float) -> str:
    """0.25 s, 42 s, 12 min, 3.5 h, 58 days."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}" if seconds < 10 * size else f"{seconds / size:.0f} {unit}"
    return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
