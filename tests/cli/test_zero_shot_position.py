"""--position NAME with --rope-factor F (tools/eval_ppl.py, tools/passkey.py): zero-shot stretches by
each position backend, checked against transformers' own rope scaling (a model it builds itself from
config.rope_parameters), not against the harness's formula; passkey past the window without
transformers' reminder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from harness.cli.eval_ppl import main as eval_ppl_main
from harness.evaluation.models import ModelSpec, load_model
from tests.conftest import ROOT

FACTOR = 2.0
WINDOW = 1024  # the tiny model's (tests/conftest.py)
LENGTH = 1500  # past the window: where dynamic NTK starts to scale
REFERENCE_ROPE = {  # what transformers' docs ask of each rope_type, and the window it reads
    "linear": ({"rope_type": "linear", "factor": FACTOR}, 2 * WINDOW),
    "dynamic": ({"rope_type": "dynamic", "factor": FACTOR}, WINDOW),
    "yarn": ({"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": WINDOW}, 2 * WINDOW),
    "llama3": ({"rope_type": "llama3", "factor": FACTOR, "original_max_position_embeddings": WINDOW,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 2 * WINDOW),
}


def reference(model_dir, position: str | None):
    """transformers' LLaMA with rope_parameters of `position` (None: the model's own rope), fp32."""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if position:
        rope, window = REFERENCE_ROPE[position]
        config.rope_parameters = {"rope_theta": config.rope_parameters["rope_theta"], **rope}
        config.max_position_embeddings = window
    return LlamaForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("position", list(REFERENCE_ROPE))
def test_zero_shot_position_computes_what_transformers_rope_type_does(model_dir, position):
    ids = torch.randint(3, 260, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    model, _, label = load_model(ModelSpec(str(model_dir), rope_factor=FACTOR, position=position))
    ours, expected = logits(model, ids), logits(reference(model_dir, position), ids)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, logits(reference(model_dir, None), ids), atol=1e-3)  # the stretch is applied
    assert label == f"tiny+{'PI' if position == 'linear' else position} x2"


def test_eval_ppl_compares_positions_side_by_side(model_dir, tmp_path, capsys):
    from harness.evaluation.perplexity import strided_perplexity
    from tests.cli.test_eval_ppl import TEXT, text_tokens

    data = tmp_path / "book.txt"
    data.write_text(TEXT)
    code = eval_ppl_main(["--model", str(model_dir), "--rope-factor", "2", "--position", "yarn",
                          "--model", str(model_dir), "--rope-factor", "2", "--position", "linear", "--data", str(data),
                          "--seq-lens", "1500",
                          "--json", str(tmp_path / "ppl.json")])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "ppl.json").read_text())["results"]
    assert [row["model"] for row in rows] == ["tiny+yarn x2", "tiny+PI x2"]
    for row, position in zip(rows, ("yarn", "linear")):
        expected = strided_perplexity(reference(model_dir, position), text_tokens(model_dir), 1500)
        assert row["ppl"] == pytest.approx(expected.ppl, rel=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--rope-factor", "2", "--position", "ntk"], "--position 'ntk' is not one of dynamic, linear, llama3, yarn"),
    (["--position", "yarn"], "--position yarn needs --rope-factor F"),
    (["--rope-factor", "0.5"], "--rope-factor 0.5 must be a finite number >= 1"),
    (["--rope-factor", "nan"], "--rope-factor nan must be a finite number >= 1"),
    (["--rope-factor", "inf"], "--rope-factor inf must be a finite number >= 1"),
    (["--adapter", "runs/x/final", "--rope-factor", "8"], "--rope-factor 8 with --adapter runs/x/final"),
])
def test_bad_position_is_one_line(model_dir, tmp_path, capsys, argv, message):
    code = eval_ppl_main(["--model", str(model_dir), "--data", str(tmp_path / "x.txt"), *argv])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"tools/eval_ppl.py: error: {message}"), lines


def test_passkey_past_the_window_says_so_once_without_transformers_reminder(model_dir, tmp_path):
    command = [sys.executable, "tools/passkey.py", "--model", str(model_dir), "--lengths", "1100",
               "--depths", "0.5", "--trials", "1", "--json", str(tmp_path / "passkey.json")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ)
    assert result.returncode == 0, result.stderr
    assert "friendly reminder" not in result.stderr
    assert "note: --lengths 1100 past the window of tiny, 1,024 tokens (default rope): measured as asked" in \
        result.stderr
