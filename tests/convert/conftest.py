"""Fixtures of the conversion tests: one tiny trained run, its verified merge, one ZeRO-2 run.

Each is built once per session (tests/convert/runs.py says how) and shared by the merge,
ZeRO-export and command-line tests; every test runs in the repo root with the shared cache.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import in_repo
from tests.convert.runs import deepspeed_run, train_tiny


@pytest.fixture(autouse=True)
def _env(cache):
    with in_repo(cache):
        yield


@pytest.fixture(scope="session")
def final(tmp_path_factory, cache) -> Path:
    return train_tiny(tmp_path_factory.mktemp("run"), cache)


@pytest.fixture(scope="session")
def merged(final, tmp_path_factory, cache):
    """The fp32 merge (NF4 round-trip base) of `final`, verified."""
    from harness.merge import merge

    with in_repo(cache):
        return merge(final, tmp_path_factory.mktemp("merged") / "model", dtype="fp32", verify=True)


@pytest.fixture(scope="session")
def zero2_checkpoint(tmp_path_factory, cache) -> Path:
    return deepspeed_run(tmp_path_factory.mktemp("zero2") / "run", cache, "launch/deepspeed/zero2_offload.json")
