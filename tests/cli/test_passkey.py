"""tools/passkey.py (harness.cli.passkey) on a saved tiny model, and a bad --depths."""
from __future__ import annotations

import json
import subprocess
import sys

from harness.cli.passkey import main as passkey_main
from tests.conftest import ROOT


def test_passkey_in_process(model_dir, tmp_path, capsys):
    code = passkey_main(["--model", str(model_dir), "--lengths", "300,400", "--depths", "0,1", "--trials", "2",
                         "--json", str(tmp_path / "passkey.json"), "--plot", str(tmp_path / "passkey.png")])
    assert code == 0
    saved = json.loads((tmp_path / "passkey.json").read_text())
    assert (saved["lengths"], saved["depths"], len(saved["trials"])) == ([300, 400], [0.0, 1.0], 8)
    assert (tmp_path / "passkey.png").exists()
    assert "Passkey" in capsys.readouterr().out


def test_bad_depths():
    out = subprocess.run([sys.executable, "tools/passkey.py", "--model", "m", "--depths", "0,2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert (out.returncode, out.stderr) == (
        2, "tools/passkey.py: error: argument --depths: '0,2': every depth must lie in [0, 1]\n")
