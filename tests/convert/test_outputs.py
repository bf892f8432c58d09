"""convert.py never writes over its input (OUT the adapter, OUT holding it, OUT inside it), and a
merge onto a base with other weights of the same shape says so (the fingerprint eval_ppl checks)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from harness import rundir
from harness.cli.convert import main
from harness.merge import merge
from tests.conftest import copy_with_other_weights


def assert_refused(capsys, argv: list[str], *words: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("convert.py: error: OUT "), err
    assert all(word in lines[0] for word in words), lines[0]


@pytest.fixture
def run(final, tmp_path) -> Path:
    """A copy of the trained run: final/ inside it."""
    copy = tmp_path / "run"
    shutil.copytree(final.parent, copy)
    return copy


def test_merge_never_replaces_its_adapter_or_the_run_holding_it(run, capsys):
    final = run / rundir.FINAL_DIR
    before = load_file(str(final / rundir.ADAPTER_WEIGHTS))
    assert_refused(capsys, ["merge", str(final), str(final), "--overwrite"], "the input ADAPTER", "the same folder")
    assert_refused(capsys, ["merge", str(final), str(run), "--overwrite"], "the input ADAPTER", "it holds")
    assert_refused(capsys, ["merge", str(final), str(final / "merged")], "it lies inside that folder")
    (run / "link").symlink_to(run)
    assert_refused(capsys, ["merge", str(final), str(run / "link"), "--overwrite"], "the input ADAPTER")
    after = load_file(str(final / rundir.ADAPTER_WEIGHTS))
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)


def test_merge_never_replaces_its_base_the_model_cache_or_a_runs_export(run, tmp_path, capsys):
    """Without --base the adapter's base comes from its recipe: a local base, or the harness's model cache
    (a random or GGUF base), is every later run's input; final/ and checkpoints are a run's steps."""
    from harness.base_model import cache_root

    final = run / rundir.FINAL_DIR
    cached = next(path for path in cache_root().glob("random/*") if path.is_dir())  # the recipe says "random"
    assert_refused(capsys, ["merge", str(final), str(cached), "--overwrite"], "inside the harness's model cache")
    other_run = tmp_path / "other-run" / rundir.FINAL_DIR
    shutil.copytree(final, other_run)
    assert_refused(capsys, ["merge", str(final), str(other_run), "--overwrite"], "a training run's export")
    local = tmp_path / "local-base"
    shutil.copytree(cached, local)
    recipe = (final / rundir.RECIPE_FILE).read_text().replace('name_or_path = "random"', f'name_or_path = "{local}"')
    (final / rundir.RECIPE_FILE).write_text(recipe)
    rundir.write_manifest(final)  # as a run whose recipe named the local base would have written it
    assert_refused(capsys, ["merge", str(final), str(local), "--overwrite"], "the input the base its recipe names")


def test_zero_to_adapter_never_replaces_the_run_of_its_checkpoint(zero2_checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(zero2_checkpoint.parent, run)
    checkpoint = run / zero2_checkpoint.name
    assert_refused(capsys, ["zero-to-adapter", str(checkpoint), str(run), "--overwrite"], "the input CHECKPOINT",
                   "it holds")
    assert_refused(capsys, ["zero-to-adapter", str(checkpoint), str(checkpoint / "adapter")],
                   "it lies inside that folder")
    assert (checkpoint / rundir.DEEPSPEED_DIR).is_dir()


def test_merge_onto_other_weights_of_the_same_shape_is_warned_about(final, tmp_path, caplog):
    base = Path(merge(final, tmp_path / "plain", dtype="fp32").notes[0].removeprefix("base: "))
    assert "weight files differ" not in caplog.text
    other = copy_with_other_weights(base, tmp_path / "other-base")
    report = merge(final, tmp_path / "merged", base=str(other), dtype="fp32", verify=True)
    assert "was trained on a base whose weight files differ from those of" in caplog.text
    assert any(note.startswith("warning: ") and "weight files differ" in note for note in report.notes)
