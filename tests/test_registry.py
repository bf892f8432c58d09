"""The backend registry: lookup, errors, lazy dependencies, entry points, the CLI table."""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from harness import registry
from tests.conftest import ROOT


def test_all_kinds_have_backends():
    for kind in registry.KINDS:
        assert registry.names(kind), kind
    assert {"linear", "dynamic", "yarn", "llama3", "none"} <= set(registry.names("position"))
    assert {"nf4", "int8", "none"} <= set(registry.names("quantization"))
    assert {"full", "s2"} <= set(registry.names("attention"))
    assert {"lora", "none"} <= set(registry.names("adapter"))
    assert {"accelerate", "deepspeed"} <= set(registry.names("engine"))


def test_unknown_name_lists_known_ones_and_the_key():
    with pytest.raises(registry.BackendError) as error:
        registry.get("position", "lineer", key="position.name")
    message = str(error.value)
    assert "position.name = 'lineer'" in message and "Did you mean 'linear'?" in message
    assert "dynamic, linear, llama3, none, yarn" in message


def test_missing_dependency_names_the_pip_command():
    @registry.register("quantization", "test-missing", description="needs a package that is not installed",
                       requires=(("surely_not_installed_pkg", "surely-not-installed>=1"),))
    def needs_missing():
        return None

    with pytest.raises(registry.BackendError, match="pip install 'surely-not-installed>=1'"):
        registry.get("quantization", "test-missing", key="quantization.name")


def test_settings_a_backend_does_not_take_are_reported():
    @dataclass(frozen=True)
    class Table:
        name: str = "test-kwargs"
        used: int = 1
        unused: int = 0

    @registry.register("adapter", "test-kwargs", description="test")
    def backend(model, *, used: int):
        return used

    entry = registry.get("adapter", "test-kwargs")
    assert registry.table_kwargs(entry, Table(used=5, unused=3)) == {"used": 5}
    assert registry.ignored_settings(entry, Table(used=5), section="adapter") == []
    assert registry.ignored_settings(entry, Table(unused=3), section="adapter") == [
        "adapter.unused = 3 has no effect with adapter.name = 'test-kwargs'"
    ]


def test_third_party_entry_point_registers_a_backend(tmp_path):
    # A real installed distribution (a .dist-info on sys.path) declaring the entry point group.
    package = tmp_path / "thirdparty_backend.py"
    package.write_text(
        "from harness.registry import register\n"
        "@register('position', 'thirdparty', description='from a plugin')\n"
        "def plugin(config, **kwargs):\n    return 1.0\n"
    )
    info = tmp_path / "thirdparty_backend-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-backend\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[harness.backends]\nthirdparty = thirdparty_backend\n")
    code = "from harness import registry; print(registry.names('position'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"})
    assert "thirdparty" in result.stdout, result.stderr


def test_backends_cli_prints_a_table():
    result = subprocess.run([sys.executable, "-m", "harness", "backends"], cwd=ROOT, capture_output=True,
                            text=True, env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    for word in ("kind", "quantization", "nf4", "present", "deepspeed"):
        assert word in result.stdout


def test_validators_run_at_recipe_load_after_the_recipe_checks_and_name_the_file(tmp_path):
    from harness.backends.sequence_parallel import check_recipe
    from harness.recipe import RecipeError, load_recipe
    from harness.recipe_checks import validate

    order = registry.validators()
    assert order[0] is validate and check_recipe in order  # the cross-field checks first, then the backends'
    recipe = tmp_path / "r.toml"
    recipe.write_text((ROOT / "recipes/tiny_cpu.toml").read_text(encoding="utf-8"), encoding="utf-8")

    @registry.register_validator
    def refuse_big_ranks(loaded):
        if loaded.adapter.r > 8:
            raise ValueError(f"adapter.r = {loaded.adapter.r} is above 8 for this test backend: use adapter.r = 8")

    try:
        with pytest.raises(RecipeError, match=rf"^{re.escape(str(recipe))}: adapter.r = 16 is above 8"):
            load_recipe(recipe, ["adapter.r=16"])
        assert load_recipe(recipe, ["adapter.r=8"]).adapter.r == 8
    finally:
        registry._VALIDATORS.remove(refuse_big_ranks)
