"""tools/convert.py (harness.cli.convert): reports, exit codes, one-line errors, a process left as it was."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.cli.convert import main
from harness.merge import nf4_round_trip
from harness.recipe import load_recipe
from tests.conftest import ROOT, tiny_llama_config
from tests.convert.runs import Q_PROJ, RUN


def test_cli_merges_bf16_and_into_original_weights(final, merged, tmp_path, capsys):
    from harness.base_model import materialize

    assert main(["merge", str(final), str(tmp_path / "bf16"), "--verify"]) == 0
    table = capsys.readouterr().out
    assert "verified" in table and "yarn factor 2.0" in table and "NF4 round trip" in table
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()} == {torch.bfloat16}

    assert main(["merge", str(final), str(tmp_path / "orig"), "--dtype", "fp32", "--base-weights", "original",
                 "--verify"]) == 0
    recipe = load_recipe("recipes/tiny_cpu.toml", RUN)
    base_dir = materialize("random", init_config=recipe.model.init_config, init_seed=recipe.model.init_seed)
    base = load_file(str(Path(base_dir) / "model.safetensors"))
    original = load_file(str(tmp_path / "orig" / "model.safetensors"))[Q_PROJ]
    dequantized = load_file(str(merged.out / "model.safetensors"))[Q_PROJ]
    assert not torch.equal(original, dequantized)  # NF4's rounding error separates the two regimes
    # ... and only it: the same LoRA delta B A * alpha / r was added to both
    nf4_base = nf4_round_trip(base[Q_PROJ], double_quant=True, dtype=torch.float32)
    torch.testing.assert_close(original - base[Q_PROJ], dequantized - nf4_base, rtol=0, atol=1e-6)


def test_a_failed_verification_exits_1_and_leaves_no_out(final, tmp_path, capsys):
    assert main(["merge", str(final), str(tmp_path / "strict"), "--verify", "--tolerance", "1e-9"]) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after library output (in-process only)
    assert message.startswith("convert.py: verification failed:") and "tolerance" in message
    assert not (tmp_path / "strict").exists()


def test_main_leaves_the_environment_as_it_was(monkeypatch, tmp_path):
    """Quieting the libraries is scoped to the command: no os.environ change leaks into the process."""
    for name in ("TQDM_DISABLE", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    from transformers.utils import logging as transformers_logging

    before, verbosity = dict(os.environ), transformers_logging.get_verbosity()
    assert main(["merge", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert dict(os.environ) == before and transformers_logging.get_verbosity() == verbosity


@pytest.fixture(scope="session")
def other_base(tmp_path_factory) -> Path:
    """A tiny LLaMA of another width: the adapter's shapes do not fit it."""
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("other") / "base"
    LlamaForCausalLM(tiny_llama_config(hidden_size=32, intermediate_size=64)).save_pretrained(path)
    return path


def no_rope(final: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "no-rope"
    shutil.copytree(final, copy)
    (copy / "rope_parameters.json").unlink()
    return copy


def existing_out(tmp_path: Path) -> Path:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    return tmp_path / "taken"


BAD = {
    "missing adapter": (lambda f, t, o: ["merge", str(t / "nope"), str(t / "o")], "no such adapter"),
    "no deepspeed files": (lambda f, t, o: ["zero-to-adapter", str(f), str(t / "o")], "no DeepSpeed checkpoint"),
    "non-numeric tolerance": (lambda f, t, o: ["merge", str(f), str(t / "o"), "--tolerance", "tight"],
                              "'tight' is not a number"),
    "unknown dtype": (lambda f, t, o: ["merge", str(f), str(t / "o"), "--dtype", "int4"], "invalid choice"),
    "missing rope file": (lambda f, t, o: ["merge", str(no_rope(f, t)), str(t / "o")],
                          "rope_parameters.json is missing"),
    "existing output": (lambda f, t, o: ["merge", str(f), str(existing_out(t))], "already exists"),
    "different base": (lambda f, t, o: ["merge", str(f), str(t / "o"), "--base", str(o)], "different base model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, final, other_base, tmp_path, cache):
    make_args, expected = BAD[case]
    command = [sys.executable, "tools/convert.py", *make_args(final, tmp_path, other_base)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HARNESS_CACHE": str(cache)})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("convert.py: error:") and expected in lines[0], result.stderr
