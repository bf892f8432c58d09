"""The grid of ways to extend the short-window testbed (harness.testbed) 4x, and its runs.

    row = row_named("longqlora")                                  # one row of GRID
    overrides = extension_overrides(testbed, corpus, run_dir, steps=200, row=row)
    final = train_or_reuse(row, testbed, corpus, run_dir, steps=200)  # final/, trained once
    spec = evaluated_model(row, testbed, run_dir, steps=200)          # ModelSpec keywords

Every trained row is recipes/testbed_longqlora.toml with the row's overrides, on the same data
with the same steps and tokens per step. bench/testbed.py runs the whole grid, harness.demo
one row of it, bench/s2_transfer.py reads the grid's finished runs (run_dir_name names them).
"""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from harness.testbed import ROOT, Corpus, TestbedError, native_window, validation_overrides, zero_shot_dir

EXTEND_RECIPE = ROOT / "recipes" / "testbed_longqlora.toml"
TESTBED_TARGET = 1024  # position.target_length of EXTEND_RECIPE


@dataclass(frozen=True)
class Row:
    """One row of the comparison grid: a model to evaluate, trained or not."""

    name: str
    label: str
    train: tuple[str, ...] | None = None  # overrides of recipes/testbed_longqlora.toml; None: nothing trains
    run: str = ""  # the trained row whose run this row evaluates ("": its own)
    position: str = "none"  # an untrained row's zero-shot rope: none | linear | dynamic | yarn
    attention: str = "full"  # attention at inference: full | s2
    fraction: float = 1.0  # the checkpoint at this share of the run's steps
    # a short training window (data.max_seq_length), in tokens (>= 1) or as a share of the target (< 1)
    window: float = 0

    @property
    def run_name(self) -> str:
        return self.run or self.name

    @property
    def full_finetuning(self) -> bool:
        return self.train is not None and 'adapter.name="none"' in self.train


FULL = 'attention.name="full"'
PI = 'position.name="linear"'  # the paper's Position Interpolation (the recipe's default is YaRN)
BASE_32BIT = 'quantization.name="none"'
FULL_FINETUNING = (BASE_32BIT, 'adapter.name="none"', FULL, "train.lr=3e-4")  # a full model takes a smaller rate
POSE = ('layout.name="pose"', FULL)  # the paper's PoSE: full attention inside a short window

GRID = (
    Row("base", "testbed, no PI"),
    Row("pi", "zero-shot PI", position="linear"),
    Row("ntk", "zero-shot dynamic NTK", position="dynamic"),
    Row("yarn", "zero-shot YaRN", position="yarn"),
    Row("longqlora", "LongQLoRA (YaRN + NF4 + LoRA r64 + S2)", train=()),
    Row("qlora-full", "QLoRA r64, YaRN, full attention", train=(FULL,)),
    Row("longqlora-pi", "LongQLoRA as in the paper (PI + NF4 + LoRA r64 + S2)", train=(PI,)),
    Row("qlora-full-pi", "QLoRA r64, PI, full attention", train=(PI, FULL)),
    Row("longqlora-ntk", "LongQLoRA with dynamic NTK (+ NF4 + LoRA r64 + S2)", train=('position.name="dynamic"',)),
    Row("lora-full", "LoRA r64, PI, 16/32-bit base, full attention", train=(PI, BASE_32BIT, FULL)),
    Row("full-ft", "full fine-tuning, PI, full attention", train=(PI, *FULL_FINETUNING)),
    Row("longqlora-s2-eval", "LongQLoRA (PI), S2 at inference", run="longqlora-pi", attention="s2"),
    Row("longqlora-r8", "LongQLoRA (PI), LoRA r8", train=(PI, "adapter.r=8")),
    Row("longqlora-quarter", "LongQLoRA (PI), 1/4 of the steps", run="longqlora-pi", fraction=0.25),
    Row("longqlora-half", "LongQLoRA (PI), 1/2 of the steps", run="longqlora-pi", fraction=0.5),
    # Why PI + S2 breaks under full attention past its group here: groups twice as long (512).
    Row("longqlora-groups-half", "LongQLoRA (PI), S2 groups of 1/2", train=(PI, "attention.group_ratio=0.5")),
    # Train short, read long: PoSE windows of target-length samples (harness.backends.layout).
    Row("pose", "PoSE + YaRN QLoRA r64, 256-token window", train=POSE, window=256),
    Row("pose-quarter", "PoSE + YaRN QLoRA r64, window of 1/4 of the target", train=POSE, window=0.25),
    Row("pose-pi", "PoSE + PI QLoRA r64 (the paper's pairing), 256-token window", train=(*POSE, PI), window=256),
    # PoSE's controls: the same windows and rope, positions 0..window-1 only (no skips).
    Row("short", "YaRN QLoRA r64 trained at 256 only, no skips", train=(FULL,), window=256),
    Row("short-quarter", "YaRN QLoRA r64 trained at 1/4 of the target only, no skips", train=(FULL,), window=0.25),
)


def row_named(name: str, rows: Sequence[Row] = GRID) -> Row:
    for row in rows:
        if row.name == name:
            return row
    raise TestbedError(f"no grid row {name!r}; rows: {', '.join(r.name for r in rows)}")


def trained_rows(rows: Sequence[Row]) -> list[Row]:
    """The rows whose runs must exist for `rows`: those that train, and those another row reads."""
    needed = {row.run_name for row in rows}
    return [row for row in GRID if row.train is not None and row.name in needed]


def checkpoint_steps(rows: Sequence[Row], run: str, steps: int) -> list[int]:
    """The steps at which run `run` must leave a checkpoint for the rows that read it (a
    fraction of the steps; the last step is final/)."""
    return sorted({round(row.fraction * steps) for row in rows if row.run_name == run and row.fraction < 1})


def extension_overrides(testbed: Path, corpus: Corpus, run_dir: Path, *, steps: int, row: Row,
                        save_every: int = 0, target_length: int = 0) -> list[str]:
    """recipes/testbed_longqlora.toml's overrides for `row` on this testbed: the same data, steps and samples
    per step for every row (a row with a short window trains that many tokens of each sample). A LoRA run
    resumes (train.resume = auto); full fine-tuning cannot resume in the harness yet, so an unfinished one
    starts over."""
    window = training_window(row, target_length or TESTBED_TARGET) if row.window else target_length
    length = [f"position.target_length={target_length}"] if target_length else []
    length += [f"data.max_seq_length={window}"] if window else []
    resume = ["train.resume=\"never\"", "train.overwrite=true"] if row.full_finetuning else ["train.resume=\"auto\""]
    return [f'model.name_or_path="{testbed}"', f'data.path="{corpus.train}"', *validation_overrides(corpus),
            f'train.output_dir="{run_dir}"', f"train.max_steps={steps}",
            f"train.save_every={0 if row.full_finetuning else save_every}", *resume, *length, *(row.train or ())]


def training_window(row: Row, target_length: int) -> int:
    """A short-window row's data.max_seq_length at `target_length`."""
    return int(row.window) if row.window >= 1 else int(row.window * target_length)


def save_every(rows: Sequence[Row], run: str, steps: int) -> int:
    """train.save_every for run `run`: every checkpoint the rows read falls on a multiple of it."""
    return math.gcd(*checkpoint_steps(rows, run, steps))  # gcd() of nothing is 0: no checkpoints


def evaluated_model(row: Row, testbed: Path, run_dir: Path | None, steps: int, factor: int = 4) -> dict:
    """ModelSpec keywords for a row: the testbed, a zero-shot variant (x factor), an adapter
    (final/ or a checkpoint) on the testbed, or a fully fine-tuned model with the testbed's tokenizer."""
    if row.train is None and not row.run:
        if row.position == "linear":
            return {"model": str(testbed), "rope_factor": float(factor)}
        if row.position != "none":
            return {"model": str(zero_shot_dir(testbed, row.position, factor * native_window(testbed)))}
        return {"model": str(testbed)}
    step = round(row.fraction * steps)
    directory = run_dir / "final" if step == steps else run_dir / f"checkpoint-{step}"
    if row_named(row.run_name).full_finetuning:
        return {"model": str(directory), "tokenizer": str(testbed), "attention": row.attention}
    return {"model": str(testbed), "adapter": str(directory), "attention": row.attention}


# --------------------------------------------------------------------------- runs

def run_dir_name(run: str, factor: int, steps: int, train_overrides: Sequence[str] = ()) -> str:
    """<run>-x<factor>-<steps>steps[-<hash of the extra overrides>]: another setting never resumes a
    run it cannot."""
    extra = "-" + hashlib.sha256(json.dumps(list(train_overrides)).encode()).hexdigest()[:8] if train_overrides else ""
    return f"{run}-x{factor}-{steps}steps{extra}"


def finished_run(run_dir: Path) -> Path | None:
    """The run's final/ when it finished, else None."""
    final = run_dir / "final"
    return final if final.is_dir() else None


def train_or_reuse(row: Row, testbed: Path, corpus: Corpus, run_dir: Path, *, steps: int, save_every: int = 0,
                   target_length: int = 0, train_overrides: Sequence[str] = (), own_process: bool = False) -> Path:
    """final/ of `row`'s run in `run_dir`: reused when the run finished, else trained (a LoRA run
    resumes where it stopped). own_process: train in a child process (launch/train.py), whose peak
    memory is its own (bench/testbed.py reports it per row)."""
    final = finished_run(run_dir)
    if final is not None:
        print(f"Using the finished run in {final} (delete it to train again)")
        return final
    overrides = [*extension_overrides(testbed, corpus, run_dir, steps=steps, row=row, save_every=save_every,
                                      target_length=target_length), *train_overrides]
    if own_process:
        subprocess.run([sys.executable, "launch/train.py", str(EXTEND_RECIPE), *overrides], cwd=ROOT, check=True)
    else:
        from harness.recipe import load_recipe
        from harness.train import train  # the training stack: only when training

        train(load_recipe(EXTEND_RECIPE, overrides))
    return run_dir / "final"
