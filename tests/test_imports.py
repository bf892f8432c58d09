"""The import structure of harness/: no cycle, and the layer order docs/architecture.md draws.

Counting the imports inside functions too: a deferred import (inside a function) hides a cycle or a
layer crossed from Python at import time, not from the design: the two modules still depend on each
other. Every `import` and `from ... import` of a harness module is an edge; `from harness.x import y`
is an edge to harness.x, and to harness.x.y when that is a module. Packages (their __init__) are nodes
like any module.

The layers, bottom to top (LAYER_ORDER): a module imports its own layer and the layers below it, never
one above. Every module belongs to a layer (a new module is placed, here and in docs/architecture.md's
"Layers" table, which must list the same layers in the same order). Three rules more: the library
never imports bench/ or tests/, and inside the backends layer the kernels never import an engine.
"""
from __future__ import annotations

import ast
import re
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

# (layer, what it is and why nothing below may import it, the modules and packages in it), bottom to top.
# "harness.x" is the module harness.x, or the package and every module in it; "harness" is the package's
# own __init__ only.
LAYER_ORDER = (
    ("foundation", "the recipe, the hardware policy, the registry, the run directory's files: what every "
                   "part reads",
     ("harness", "harness.errors", "harness.offline", "harness.quiet", "harness.atomic", "harness.fingerprint",
      "harness.policy", "harness.registry", "harness.recipe", "harness.recipe_checks", "harness.rundir",
      "harness.metrics", "harness.base_model", "harness.tokenizer", "harness.cpu_memory")),
    ("backends", "the pluggable parts and the tensor functions they run, built without the data, the model "
                 "assembly or a run",
     ("harness.backends", "harness.loss", "harness.tiled", "harness.dropout")),
    ("data", "reading and shaping samples, without a model", ("harness.data",)),
    ("model", "model assembly from the recipe and its backends", ("harness.model",)),
    ("planner", "a recipe's memory predicted from the config alone: it never loads a model or runs the "
                "trainer",
     ("harness.memory",)),
    ("reading a model", "evaluation, generation and conversion of a model: they run without the training "
                        "stack",
     ("harness.evaluation", "harness.generation", "harness.conversion", "harness.merge", "harness.zero_export")),
    ("training stack", "a run set up and stepped: session, loop, checkpoints, resume",
     ("harness.session", "harness.loop", "harness.loop_eval", "harness.loop_saving", "harness.loop_memory",
      "harness.progress", "harness.signals", "harness.step_time", "harness.checkpoint", "harness.resume")),
    ("entry point", "train(): a recipe in, an adapter out", ("harness.train",)),
    ("experiments", "runs of runs: the testbed, its grid, the demo", ("harness.testbed", "harness.experiments",
                                                                      "harness.demo")),
    ("command lines", "what the user runs: nothing imports it", ("harness.cli", "harness.__main__")),
)

ENGINES = ("harness.backends.accelerate_engine", "harness.backends.deepspeed_engine", "harness.backends.engine",
           "harness.backends.fsdp")
KERNELS = ("harness.backends.s2", "harness.backends.token_masks", "harness.backends.sliding_window")
# module prefix -> the modules (and their submodules) it must not import, and why: what the layer order
# does not say on its own
RULES = {
    "harness": (("bench", "tests"), "the library never reaches into the benchmarks or the tests"),
    **{kernel: (ENGINES, "a kernel is a tensor function, runnable without an engine or the training loop")
       for kernel in KERNELS},
}


def within(name: str, entry: str) -> bool:
    """Whether module `name` is `entry` or inside the package `entry` (the root package: itself only)."""
    return name == entry or (entry != "harness" and name.startswith(entry + "."))


def layer_of(name: str) -> int | None:
    """The index in LAYER_ORDER of module `name`'s layer (its most specific entry), None when it has none."""
    found = [(len(entry), index) for index, (_, _, entries) in enumerate(LAYER_ORDER)
             for entry in entries if within(name, entry)]
    return max(found)[1] if found else None


def upward_imports(name: str, imported: set[str]) -> list[str]:
    """The imports of module `name` that reach a layer above its own, each with the reason."""
    own = layer_of(name)
    found = []
    for module in sorted(imported):
        layer = layer_of(module)
        if own is not None and layer is not None and layer > own:
            lower, upper = LAYER_ORDER[own][0], LAYER_ORDER[layer]
            found.append(f"{name} ({lower}) imports {module} ({upper[0]}), a layer above its own: "
                         f"{upper[0]} is {upper[1]}")
    return found


def forbidden_imports(name: str, imported: set[str]) -> list[str]:
    """The imports of module `name` that RULES forbids, each with its reason."""
    found = []
    for prefix, (banned, why) in RULES.items():
        if name == prefix or name.startswith(prefix + "."):
            found += [f"{name} imports {module}: {why}" for module in sorted(imported)
                      if any(module == ban or module.startswith(ban + ".") for ban in banned)]
    return found


def library_imports() -> dict[str, set[str]]:
    """{harness module: every module it imports, harness or not}."""
    return {module_name(path): imported_names(path.read_text(encoding="utf-8"), module_name(path),
                                              package=path.name == "__init__.py")
            for path in HARNESS.rglob("*.py")}


def test_a_deferred_import_across_a_layer_is_found():
    source = "def f():\n    from harness.loop import Loop\n    import bench.common\n"
    training = next(why for name, why, _ in LAYER_ORDER if name == "training stack")
    assert upward_imports("harness.memory.measure", imported_names(source, "harness.memory.measure")) == [
        f"harness.memory.measure (planner) imports {name} (training stack), a layer above its own: "
        f"training stack is {training}" for name in ("harness.loop", "harness.loop.Loop")]
    assert forbidden_imports("harness.memory.measure", imported_names(source, "harness.memory.measure")) == [
        "harness.memory.measure imports bench.common: the library never reaches into the benchmarks or the tests"]
    source = "from harness.backends.engine import Engine\n"
    assert forbidden_imports("harness.backends.s2", imported_names(source, "harness.backends.s2")) == [
        f"harness.backends.s2 imports {name}: " + RULES["harness.backends.s2"][1]
        for name in ("harness.backends.engine", "harness.backends.engine.Engine")]


def test_layer_of_takes_the_most_specific_entry():
    assert LAYER_ORDER[layer_of("harness")][0] == "foundation"
    assert LAYER_ORDER[layer_of("harness.memory.measure")][0] == "planner"
    assert LAYER_ORDER[layer_of("harness.loop_memory")][0] == "training stack"  # not harness.loop's prefix
    assert LAYER_ORDER[layer_of("harness.cli.train")][0] == "command lines"
    assert layer_of("harness.unplaced") is None
    assert upward_imports("harness.recipe", {"harness.backends.position"})  # the recipe never imports a backend


def test_every_module_has_a_layer():
    entries = [entry for _, _, layer_entries in LAYER_ORDER for entry in layer_entries]
    graph = import_graph()
    assert not [entry for entry in entries if entry not in graph], "LAYER_ORDER names modules that do not exist"
    assert len(entries) == len(set(entries)), "a module is in two layers"
    unplaced = sorted(name for name in graph if layer_of(name) is None)
    assert not unplaced, (f"modules in no layer: {unplaced}. Place each in LAYER_ORDER (tests/test_imports.py) and in "
                          f"the Layers table of docs/architecture.md")


def test_no_import_reaches_a_layer_above():
    graph = import_graph()
    found = [message for name, imported in sorted(graph.items()) for message in upward_imports(name, imported)]
    assert not found, "\n".join(found)


def test_library_rules_hold():
    assert set(KERNELS) | set(ENGINES) <= set(import_graph())  # the rules name real modules
    found = [message for name, imported in sorted(library_imports().items())
             for message in forbidden_imports(name, imported)]
    assert not found, "\n".join(found)


def test_the_layers_are_the_ones_docs_architecture_draws():
    """docs/architecture.md's Layers table: one row per layer, top to bottom, with the same modules."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("\n### Layers\n", 1)[1].split("\n#", 1)[0]
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in section.splitlines()
             if line.startswith("| **")]
    drawn = [(name.strip("*"), sorted(doc_module(path) for path in re.findall(r"`([^`]+)`", modules)))
             for name, modules, *_ in cells]
    assert drawn == [(name, sorted(entries)) for name, _, entries in reversed(LAYER_ORDER)]


def doc_module(path: str) -> str:
    """harness/memory/ -> harness.memory, harness/cli/__init__.py -> harness.cli, harness/loop.py -> harness.loop."""
    return module_name(ROOT / path.rstrip("/")) if path.endswith(".py") else path.rstrip("/").replace("/", ".")
