"""No import cycle inside harness/, counting the imports inside functions too.

A deferred import (inside a function) hides a cycle from Python at import time, not from the
design: the two modules still depend on each other. Every `import` and `from ... import` of
a harness module is an edge; `from harness.x import y` is an edge to harness.x, and to
harness.x.y when that is a module. Packages (their __init__) are nodes like any module.
"""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

HARNESS = ROOT / "harness"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, name: str, *, package: bool = False) -> set[str]:
    """Every module name the source of module `name` imports (harness or not), relative ones resolved."""
    parent = name if package else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node.module, node.level, parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def absolute(module: str | None, level: int, parent: str) -> str:
    """`from .x import` (level 1) inside package a.b -> a.b.x; level 2 -> a.x."""
    if not level:
        return module
    parts = parent.split(".")
    return ".".join(parts[:len(parts) - level + 1] + ([module] if module else []))


def import_graph() -> dict[str, set[str]]:
    """{harness module: the harness modules it imports}."""
    paths = {module_name(p): p for p in HARNESS.rglob("*.py")}
    return {name: imported_names(path.read_text(encoding="utf-8"), name, package=path.name == "__init__.py")
            & paths.keys() - {name} for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) per back edge of a depth-first search."""
    found, done, stack = [], set(), []

    def visit(node: str) -> None:
        stack.append(node)
        for target in sorted(graph[node]):
            if target in stack:
                found.append(stack[stack.index(target):] + [target])
            elif target not in done:
                visit(target)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return found


def test_deferred_relative_and_from_imports_are_edges():
    source = "import harness.a\ndef f():\n    from harness.b import c\n    from . import d\n    from ..e import g\n"
    assert imported_names(source, "harness.pkg", package=True) == {
        "harness.a", "harness.b", "harness.b.c", "harness.pkg", "harness.pkg.d", "harness.e", "harness.e.g"}
    assert "harness.evaluation.perplexity" in import_graph()["harness.evaluation"]  # a package is a node


def test_no_import_cycle_in_harness():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


# --------------------------------------------------------------------------- layers

ENGINES = ("harness.backends.accelerate_engine", "harness.backends.deepspeed_engine", "harness.backends.engine",
           "harness.backends.fsdp", "harness.train")
KERNELS = ("harness.backends.s2", "harness.backends.attention_kernels")
# module prefix -> the modules (and their submodules) it must not import, and why
LAYERS = {
    "harness": (("bench",), "the library never reaches into the benchmarks"),
    "harness.recipe": (("harness.backends",), "a recipe is read and checked without any backend; "
                                              "a backend's own checks come through harness.registry.validators"),
    "harness.recipe_checks": (("harness.backends",), "as harness.recipe"),
    **{kernel: (ENGINES, "a kernel is a tensor function, runnable without an engine or the training loop")
       for kernel in KERNELS},
}


def forbidden_imports(name: str, imported: set[str]) -> list[str]:
    """The imports of module `name` that LAYERS forbids, each with its reason."""
    found = []
    for layer, (banned, why) in LAYERS.items():
        if name == layer or name.startswith(layer + "."):
            found += [f"{name} imports {module}: {why}" for module in sorted(imported)
                      if any(module == ban or module.startswith(ban + ".") for ban in banned)]
    return found


def test_a_deferred_import_across_a_layer_is_found():
    source = "def f():\n    from harness.backends.position import linear_position\n    import bench.common\n"
    assert forbidden_imports("harness.recipe", imported_names(source, "harness.recipe")) == [
        "harness.recipe imports bench.common: the library never reaches into the benchmarks",
        "harness.recipe imports harness.backends.position: " + LAYERS["harness.recipe"][1],
        "harness.recipe imports harness.backends.position.linear_position: " + LAYERS["harness.recipe"][1],
    ]
    assert forbidden_imports("harness.backends.attention", imported_names(source, "harness.backends.attention")) == [
        "harness.backends.attention imports bench.common: the library never reaches into the benchmarks"]


def test_library_layers_hold():
    named = set(KERNELS) | {"harness.recipe", "harness.recipe_checks"}
    assert named <= set(import_graph())  # the rules name real modules
    found = [message for path in HARNESS.rglob("*.py")
             for message in forbidden_imports(module_name(path), imported_names(
                 path.read_text(encoding="utf-8"), module_name(path), package=path.name == "__init__.py"))]
    assert not found, "\n".join(found)
