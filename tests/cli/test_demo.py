"""`python -m harness demo` (harness.demo, harness.cli.demo): its data, its bad-input messages; the run is slow."""
from __future__ import annotations

import subprocess
import sys

import pytest

from harness.demo import DemoError, prepare_data
from tests.conftest import ROOT


def test_shipped_books_are_split_into_train_validation_and_held_out(tmp_path):
    corpus = prepare_data(None, tmp_path)
    names = {p.name for p in corpus.train.iterdir()}
    assert names == {"jack_sheppard.txt", "news_from_nowhere.txt", "the_devils_dictionary.txt"}
    assert corpus.held_out.name == "the_complete_angler.txt"  # held out, never trained on
    assert len(corpus.held_out.read_text()) > 200_000  # > 16k tokens for SmolLM2's 16k evaluation
    tails = corpus.validation.read_text()
    assert len(tails) > 3 * 15_000 and tails[-1000:] not in (corpus.train / "the_devils_dictionary.txt").read_text()


def test_verdict_holds_only_near_the_window_and_past_the_base_and_pi():
    from harness.demo import verdict

    ppl = {"base": {256: 6.5, 1024: 10.9}, "pi": {256: 30.0, 1024: 30.7}, "yarn": {256: 7.0, 1024: 7.05},
           "longqlora": {256: 6.4, 1024: 6.6}}
    assert verdict(ppl, 256, 1024).startswith("Extension holds: LongQLoRA reads 1024 tokens (4x the window)")
    assert "+1.5% against the testbed at its own 256 (6.50)" in verdict(ppl, 256, 1024)
    broken = {**ppl, "longqlora": {256: 6.7, 1024: 12.8}}
    assert verdict(broken, 256, 1024).startswith("Extension falls short")
    just_over = {**ppl, "longqlora": {256: 6.7, 1024: 6.9}}  # 6.9 > 1.05 x 6.5
    assert verdict(just_over, 256, 1024).startswith("Extension falls short")


def test_user_folder_without_usable_text_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(DemoError, match="found 0 non-empty"):
        prepare_data(tmp_path, tmp_path / "out")


def test_demo_cli_reports_bad_data_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "harness", "demo", "--data", str(tmp_path),
                             "--output", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the demo needs at least two" in " ".join(result.stderr.split())


@pytest.mark.slow
def test_demo_runs_end_to_end_on_smollm2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "harness", "demo", "--steps", "1", "--eval-tokens", "4097",
                             "--output", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "ppl.png").is_file() and (tmp_path / "run" / "ppl.json").is_file()
