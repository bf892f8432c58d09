"""harness.offline: bitsandbytes on an AVX512-BF16 CPU fetches no hub kernel and prints no warning about it."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

# A fake `kernels` package that records any attempt to fetch a hub kernel; bitsandbytes is made to see
# an AVX512-BF16 CPU by patching its native library's probe before its package __init__ runs.
SIMULATION = r"""
import importlib, pathlib, sys, types
{harness}
spec = importlib.util.find_spec("bitsandbytes")
parent = types.ModuleType("bitsandbytes"); parent.__path__ = spec.submodule_search_locations
sys.modules["bitsandbytes"] = parent
import bitsandbytes.cextension as cext
cext.lib.has_avx512bf16_cpu = lambda: True
del sys.modules["bitsandbytes"]
import bitsandbytes
print("imported")
"""
FAKE_KERNELS = """
import pathlib
def get_kernel(name, version=None):
    pathlib.Path(__file__).with_name("ATTEMPTED").write_text(name)
    raise RuntimeError("trust_remote_code: no hub here")
"""


def run(tmp_path, with_harness: bool) -> subprocess.CompletedProcess:
    (tmp_path / "kernels").mkdir(exist_ok=True)
    (tmp_path / "kernels" / "__init__.py").write_text(FAKE_KERNELS)
    code = SIMULATION.format(harness="import harness" if with_harness else "")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_no_hub_kernel_is_fetched_and_no_warning_printed(tmp_path):
    without = run(tmp_path, with_harness=False)  # the simulation reproduces the problem
    assert "imported" in without.stdout, without.stderr
    assert (tmp_path / "kernels" / "ATTEMPTED").is_file()
    assert "Failed to load CPU gemm_4bit_forward from kernels-community" in without.stderr
    (tmp_path / "kernels" / "ATTEMPTED").unlink()

    with_harness = run(tmp_path, with_harness=True)
    assert "imported" in with_harness.stdout, with_harness.stderr
    assert not (tmp_path / "kernels" / "ATTEMPTED").exists()
    assert "kernels-community" not in with_harness.stderr and "trust_remote_code" not in with_harness.stderr
