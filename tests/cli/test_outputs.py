"""No tool writes over its input, and an output that cannot be written is refused before any work
(harness.atomic.check_output): eval_ppl, passkey and prepare_data; convert's in tests/convert/test_outputs.py."""
from __future__ import annotations

import pytest

from harness.cli.eval_ppl import main as eval_ppl_main
from harness.cli.passkey import main as passkey_main

DATA = "The grass is green. The sky is blue. " * 40


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"text": "%s"}\n' % DATA)
    return path


def refused(capsys, code: int, *words: str) -> str:
    """The one stderr line of a refused command; every word in it."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


def eval_ppl(model_dir, data, *extra) -> int:
    return eval_ppl_main(["--model", str(model_dir), "--data", str(data), "--seq-lens", "64", *map(str, extra)])


def test_eval_ppl_json_over_its_data_is_refused_and_the_data_kept(model_dir, data, tmp_path, capsys):
    (tmp_path / "link.json").symlink_to(data)
    for output in (data, tmp_path / "link.json", tmp_path / ".." / tmp_path.name / "data.json"):
        refused(capsys, eval_ppl(model_dir, data, "--json", output), "--json", "would overwrite the input --data")
    refused(capsys, eval_ppl(model_dir, tmp_path, "--json", tmp_path / "ppl.json"),  # inside the data folder
            "it lies inside that folder")
    refused(capsys, eval_ppl(model_dir, data, "--plot", model_dir / "ppl.png"), "--plot", "--model")
    assert data.read_text() == '{"text": "%s"}\n' % DATA


def test_eval_ppl_json_that_its_data_glob_would_read_is_refused(model_dir, data, tmp_path, capsys):
    pattern = tmp_path / "d*.json"  # names data.json now, and a new d2.json once written
    refused(capsys, eval_ppl(model_dir, pattern, "--json", tmp_path / "d2.json"), "--json", "matches the input --data")
    assert not (tmp_path / "d2.json").exists()


def test_eval_ppl_output_that_cannot_be_written_is_one_line_before_scoring(model_dir, data, tmp_path, capsys):
    refused(capsys, eval_ppl(model_dir, data, "--json", tmp_path), "--json", "is a folder")
    refused(capsys, eval_ppl(model_dir, data, "--json", "/sys/ppl.json"), "--json /sys/ppl.json", "cannot write")
    refused(capsys, eval_ppl(model_dir, data, "--plot", tmp_path / "ppl.json"), "--plot", "not a figure format")
    refused(capsys, eval_ppl(model_dir, data, "--json", tmp_path / "r.png", "--plot", tmp_path / "r.png"),
            "--json and --plot are both")


def test_eval_ppl_json_in_a_new_folder_is_written(model_dir, data, tmp_path, capsys):
    assert eval_ppl(model_dir, data, "--json", tmp_path / "new" / "ppl.json") == 0
    assert '"results"' in (tmp_path / "new" / "ppl.json").read_text()


def test_passkey_json_over_its_model_is_refused(model_dir, tmp_path, capsys):
    config = model_dir / "config.json"
    before = config.read_text()
    code = passkey_main(["--model", str(model_dir), "--lengths", "64", "--json", str(config)])
    refused(capsys, code, "--json", "would overwrite the input --model")
    code = passkey_main(["--model", str(model_dir), "--lengths", "64", "--json", str(tmp_path)])
    refused(capsys, code, "--json", "is a folder")
    assert config.read_text() == before
