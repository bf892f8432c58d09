"""`python -m harness demo` (harness.demo, harness.cli.demo): its data, its bad-input messages; the run is slow."""
from __future__ import annotations

import subprocess
import sys

import pytest

from harness.demo import DemoError, prepare_data
from tests.conftest import ROOT


def test_stdlib_documents_are_split_into_train_and_held_out(tmp_path):
    train_dir, held_out = prepare_data(None, tmp_path)
    names = {p.name for p in train_dir.iterdir()}
    assert len(names) >= 10 and "argparse.txt" in names
    assert not names & {"pydoc.txt", "turtle.txt", "typing.txt"}  # held out, never trained on
    assert len(held_out.read_text()) > 200_000  # > 16k tokens for the 16k evaluation


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
