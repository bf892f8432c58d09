"""The slow-step warning, on a scripted clock: projected from the micro-batches done, once per step."""
from __future__ import annotations

from harness.step_time import StepTimeWatch, format_seconds


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_step(watch: StepTimeWatch, clock: Clock, seconds_per_micro: float, step: int) -> list[str]:
    watch.start()
    warnings = []
    for done in range(1, watch.grad_accum + 1):
        clock.now += seconds_per_micro
        warnings.append(watch.micro_batch_done(done, step))
    watch.finish()
    return [w for w in warnings if w]


def test_a_huge_first_step_is_announced_after_its_first_micro_batch():
    clock = Clock()
    watch = StepTimeWatch(100_000_000, clock)
    watch.start()
    clock.now += 0.05
    warning = watch.micro_batch_done(1, step=1)
    assert warning == ("step 1 will take about 58 days at this pace (100,000,000 micro-batches of 0.05 s); "
                       "check train.grad_accum (100,000,000) and train.micro_batch_size")
    clock.now += 0.05
    assert watch.micro_batch_done(2, step=1) is None  # once per step


def test_a_step_ten_times_the_runs_median_is_warned_once_and_normal_steps_are_not():
    clock = Clock()
    watch = StepTimeWatch(8, clock)
    assert run_step(watch, clock, 30.0, step=1) == []  # 4 min: a first step below an hour is not judged
    for step in range(2, 6):
        assert run_step(watch, clock, 30.0 * (1 + step % 2), step) == []  # 4-8 min, within 10x
    warnings = run_step(watch, clock, 30.0 * 25, step=6)  # 100 min against a median of 4 min
    assert warnings == ["step 6 will take about 1.7 h at this pace (8 micro-batches of 12 min), 25x the median of "
                        "the run's recent steps (4.0 min): is the machine swapping or busy with another job?"]


def test_short_steps_are_never_warned_however_uneven():
    clock = Clock()
    watch = StepTimeWatch(2, clock)
    run_step(watch, clock, 0.1, step=1)
    assert run_step(watch, clock, 20.0, step=2) == []  # 200x the median, but under a minute


def test_format_seconds():
    assert [format_seconds(s) for s in (0.25, 42, 720, 12_600, 5_011_200)] == ["0.25 s", "42 s", "12 min", "3.5 h",
                                                                              "58 days"]
