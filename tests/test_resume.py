"""harness.resume on the tiny recipe: memory-only changes are allowed and named on one line; a
checkpoint at or past train.max_steps trains nothing and says which adapter it exports."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness import rundir
from harness.recipe import load_recipe
from harness.resume import ResumeError
from harness.train import train
from tests.conftest import in_repo

STEPS = ["train.max_steps=6", "train.save_every=2", "data.max_seq_length=256", "train.keep_checkpoints=0"]
MEMORY_ONLY = ["train.gradient_checkpointing=false", "train.chunked_loss=false", "train.cpu_cache_mib=0",
               "attention.kernel=\"eager\"", "train.offload_activations=true"]

pytestmark = pytest.mark.usefixtures("session_cache")


def tiny(output_dir: Path, *overrides: str):
    return load_recipe("recipes/tiny_cpu.toml", [f"train.output_dir=\"{output_dir}\"", *STEPS, *overrides])


@pytest.fixture(scope="module")
def stopped_once(tmp_path_factory, cache) -> Path:
    """A run stopped by SIGTERM after step 4: checkpoints 2 and 4, no final/."""
    output = tmp_path_factory.mktemp("stopped") / "run"
    with in_repo(cache):
        train(tiny(output), after_step=lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 4 else None)
    return output


@pytest.fixture
def stopped(stopped_once, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(stopped_once, copy)
    return copy


def said(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())  # rich wraps long lines


def final_step(output: Path) -> int:
    return json.loads((output / rundir.FINAL_DIR / rundir.STATE_FILE).read_text())["step"]


def test_memory_only_changes_are_allowed_and_named_on_one_line(stopped, capsys):
    capsys.readouterr()
    train(tiny(stopped, "train.resume=\"auto\"", *MEMORY_ONLY))
    text = said(capsys)
    assert text.count("Resuming with changed memory settings") == 1 and final_step(stopped) == 6
    assert not any(f"changed setting: {change.split('=')[0]}" in text for change in MEMORY_ONLY)  # named once
    for change in ("train.gradient_checkpointing True -> False", "train.chunked_loss True -> False",
                   "train.cpu_cache_mib 256 -> 0", "attention.kernel 'auto' -> 'eager'",
                   "train.offload_activations False -> True", "they change only the memory"):
        assert change in text, text


def test_other_changes_are_still_refused_beside_memory_only_ones(stopped):
    with pytest.raises(ResumeError, match=r"train\.lr 0\.002 -> 0\.05\. Undo them"):
        train(tiny(stopped, "train.resume=\"auto\"", "train.gradient_checkpointing=false", "train.lr=0.05"))


@pytest.mark.parametrize("max_steps, words", [
    (3, "train.max_steps = 3 is below the 4 steps checkpoint-4 already trained: no step is trained; its adapter "
        "(step 4) is exported to"),
    (4, "checkpoint-4 already trained train.max_steps = 4 steps: no step is trained; its adapter (step 4) is "
        "exported to"),
])
def test_a_checkpoint_at_or_past_max_steps_says_what_it_exports(stopped, capsys, max_steps, words):
    capsys.readouterr()
    train(tiny(stopped, "train.resume=\"auto\"", f"train.max_steps={max_steps}"))
    text = said(capsys)
    assert words in text and str(stopped / rundir.FINAL_DIR) in text
    assert ("start over with train.overwrite=true" in text) == (max_steps < 4)
    assert final_step(stopped) == 4
    exported = load_file(str(stopped / rundir.FINAL_DIR / rundir.ADAPTER_WEIGHTS))
    saved = load_file(str(stopped / "checkpoint-4" / rundir.ADAPTER_WEIGHTS))
    assert exported.keys() == saved.keys()
    for name in saved:
        torch.testing.assert_close(exported[name], saved[name], rtol=0, atol=0)
