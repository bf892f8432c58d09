"""Backend registry: named implementations of each pluggable kind.

A backend is a function registered under (kind, name):

    @register("position", "linear", description="Position Interpolation", requires=())
    def linear_position(config, *, target_length, factor): ...

`requires` lists (import name, pip requirement) pairs that are checked lazily: importing
the harness never fails for a missing extra, but *selecting* such a backend fails with the
pip command that installs it. Third-party packages add backends through the entry-point
group ``harness.backends``: each entry point names a module (or callable) whose import
registers its backends with this decorator.

A module may also register a check of the whole recipe, run at every recipe load
(harness.recipe.validate) after harness.recipe_checks' own, which checks the backend names; it
raises a ValueError naming the key, the value and the fix, and the recipe adds its file:

    @register_validator
    def check_sequence_parallel(recipe): ...
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Callable

from harness.errors import HarnessError

KINDS = ("position", "quantization", "attention", "adapter", "engine", "data", "layout")
ENTRY_POINT_GROUP = "harness.backends"

# Modules that register the built-in backends (and validators) when imported; the recipe's own
# cross-field checks first, so they run before any backend's.
_BUILTIN_MODULES = (
    "harness.recipe_checks",
    "harness.backends.position",
    "harness.backends.quantization",
    "harness.backends.attention",
    "harness.backends.adapter",
    "harness.backends.accelerate_engine",
    "harness.backends.deepspeed_engine",
    "harness.backends.sequence_parallel",
    "harness.data.backends",
    "harness.backends.layout",
)


class BackendError(HarnessError, ValueError):
    """A backend was named that does not exist or cannot run on this machine."""


@dataclass(frozen=True)
class Backend:
    kind: str
    name: str
    fn: Callable
    description: str
    requires: tuple[tuple[str, str], ...]  # (import name, pip requirement)

    def missing(self) -> list[str]:
        """Pip requirements whose import name is not installed here."""
        return [pip for module, pip in self.requires if importlib.util.find_spec(module) is None]

    def check_available(self, key: str) -> None:
        missing = self.missing()
        if missing:
            raise BackendError(
                f"{key} = {self.name!r} needs {', '.join(missing)}, which is not installed. "
                f"Install it with: pip install {' '.join(repr(m) for m in missing)}"
            )


_REGISTRY: dict[str, dict[str, Backend]] = {kind: {} for kind in KINDS}
_VALIDATORS: list[Callable] = []  # fn(recipe) -> None, raising ValueError
_loaded = False


def register(kind: str, name: str, *, description: str, requires: tuple[tuple[str, str], ...] = ()):
    """Decorator: register `fn` as backend `name` of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"unknown backend kind {kind!r}; kinds are {', '.join(KINDS)}")

    def decorate(fn: Callable) -> Callable:
        _REGISTRY[kind][name] = Backend(kind, name, fn, description, tuple(requires))
        return fn

    return decorate


def register_validator(fn: Callable) -> Callable:
    """Decorator: `fn(recipe)` checks a loaded recipe for a backend (see the module docstring)."""
    if fn not in _VALIDATORS:
        _VALIDATORS.append(fn)
    return fn


def validators() -> list[Callable]:
    """The registered recipe checks: the built-in modules' in the order of _BUILTIN_MODULES (the
    recipe's own cross-field checks first, whichever module was imported first), then plugins'."""
    load_backends()
    return sorted(_VALIDATORS, key=_builtin_rank)


def _builtin_rank(fn: Callable) -> int:
    module = getattr(fn, "__module__", "")
    return _BUILTIN_MODULES.index(module) if module in _BUILTIN_MODULES else len(_BUILTIN_MODULES)


def load_backends() -> None:
    """Import the built-in backend modules and every third-party entry point, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry_point.load()
        if callable(loaded):
            loaded()


def names(kind: str) -> list[str]:
    load_backends()
    return sorted(_REGISTRY[kind])


def get(kind: str, name: str, *, key: str | None = None) -> Backend:
    """The backend `name` of `kind`; `key` is the recipe key that named it (for errors)."""
    load_backends()
    key = key or f"{kind}.name"
    known = _REGISTRY[kind]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BackendError(
            f"{key} = {name!r} is not a known {kind} backend.{hint} "
            f"Known {kind} backends: {', '.join(sorted(known))}."
        )
    backend = known[name]
    backend.check_available(key)
    return backend


def all_backends() -> list[Backend]:
    load_backends()
    return [backend for kind in KINDS for _, backend in sorted(_REGISTRY[kind].items())]


def table_kwargs(backend: Backend, table) -> dict:
    """The fields of a recipe table that `backend`'s function takes, as keyword arguments."""
    import dataclasses

    accepted = _accepted_parameters(backend)
    return {f.name: getattr(table, f.name) for f in dataclasses.fields(table)
            if f.name != "name" and (accepted is None or f.name in accepted)}


def ignored_settings(backend: Backend, table, *, section: str) -> list[str]:
    """Fields set away from their default that `backend` does not take, as messages.

    Switching a backend by override (adapter.name=none) leaves the old backend's settings in
    the table; they are reported, never silently dropped.
    """
    import dataclasses

    accepted = _accepted_parameters(backend)
    if accepted is None:
        return []
    return [
        f"{section}.{f.name} = {getattr(table, f.name)!r} has no effect with {section}.name = {backend.name!r}"
        for f in dataclasses.fields(table)
        if f.name != "name" and f.name not in accepted and getattr(table, f.name) != _default_of(f)
    ]


def _accepted_parameters(backend: Backend) -> set[str] | None:
    """Keyword names the backend function takes; None when it takes any (**kwargs)."""
    import inspect

    parameters = inspect.signature(backend.fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return set(parameters)


def _default_of(f):
    import dataclasses

    return f.default_factory() if f.default is dataclasses.MISSING else f.default
