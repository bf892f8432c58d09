"""The README's first flow prints nothing the user has to decode.

Its train and eval_ppl lines (README.md, "Train, evaluate, generate") run as a newcomer runs them,
with an empty data cache, each in its own process: no library deprecation warning, no
DeepSpeed accelerator guess, no datasets progress bar over one record, no bitsandbytes kernel
warning, no warning about the recipe's own position/attention pairing. What is the user's
business stays: the data table, the step line, where the adapter went, the perplexity table.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

NOISE = {
    "transformers deprecation": "FutureWarning",
    "a warnings.warn source line": "warnings.warn(",
    "DeepSpeed's accelerator guess": "Setting accelerator to CPU",
    "datasets progress bar": "examples/s",
    "bitsandbytes kernel without autograd": "gemv_4bit",
    "the recipe warns about itself": "the paper's pairing",
}


def quick_start() -> list[str]:
    """The first bash block under README's "Train, evaluate, generate"."""
    section = (ROOT / "README.md").read_text().split("## Train, evaluate, generate", 1)[1]
    body = re.search(r"^```bash\n(.*?)^```", section, re.S | re.M).group(1)
    return [line.split("  #", 1)[0].strip() for line in body.splitlines() if line.strip()]


def run(command: str, tmp_path, env) -> str:
    argv = shlex.split(command.replace("runs/tiny_cpu", str(tmp_path / "run")))
    assert argv[0] == "python"
    if "launch/train.py" in argv[1]:
        argv += [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2"]
    result = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"`{command}` exited {result.returncode}:\n{output[-3000:]}"
    return output


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, cache):
    """Each program's stdout and stderr. HOME is new, so the data cache is empty, as on a first run
    (datasets draws its bars only on a map it has not cached); the base models are the session's."""
    tmp_path = tmp_path_factory.mktemp("first-run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path / "home"), "HARNESS_CACHE": str(cache)}
    commands = [line for line in quick_start() if "launch/train.py" in line or "tools/eval_ppl.py" in line]
    assert len(commands) == 2, quick_start()
    return {command.split()[1]: run(command, tmp_path, env) for command in commands}


@pytest.mark.parametrize("program", ["launch/train.py", "tools/eval_ppl.py"])
def test_first_run_prints_no_noise(outputs, program):
    output = outputs[program]
    found = {what: [line for line in output.splitlines() if text in line][:2]
             for what, text in NOISE.items() if text in output}
    assert not found, f"{program} printed what a newcomer has to decode: {found}"


def test_first_run_keeps_what_is_the_users_business(outputs):
    train, evaluation = outputs["launch/train.py"], outputs["tools/eval_ppl.py"]
    assert "tokens per document" in train and "train 2/2" in train and "Adapter written to" in train
    assert "seq_len=512: ppl" in evaluation and "Perplexity (strided)" in evaluation
