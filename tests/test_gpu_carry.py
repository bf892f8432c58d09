"""bench/gpu_carry.py: what the GPU machine lacks, in parts under a call's limit, joined and checked there."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

import bench.gpu_carry as carry


def packed(tmp_path, monkeypatch, part_mib: int = 1):
    """A 2.5 MiB tar (a wheel and a GGUF) split the way pack() splits it; the manifest beside the parts."""
    gguf = bytes(range(256)) * 6000
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        files = (("wheels/x-1.0-py3-none-any.whl", b"wheel" * 200_000), (f"gguf/{carry.GGUF.rsplit('/', 1)[1]}", gguf))
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tar_path = tmp_path / "carry.tar"
    tar_path.write_bytes(buffer.getvalue())
    stage = tmp_path / "stage"
    stage.mkdir()
    parts = carry.split(tar_path, stage, part_mib)
    manifest = {"tar_sha256": carry.sha256(tar_path), "gguf": carry.GGUF,
                "gguf_sha256": hashlib.sha256(gguf).hexdigest(), "wheels": ["x-1.0-py3-none-any.whl"], "parts": parts}
    (stage / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    return stage, manifest


def test_parts_stay_under_the_limit_and_join_into_the_harness_cache(tmp_path, monkeypatch):
    stage, manifest = packed(tmp_path, monkeypatch)
    assert [p["bytes"] for p in manifest["parts"]] == [1 << 20, 1 << 20, manifest["parts"][2]["bytes"]]
    carry.join(stage)
    package, _, member = carry.GGUF.removeprefix("pypi:").partition("/")
    assert carry.sha256(tmp_path / "cache" / "pypi" / package / member) == manifest["gguf_sha256"]
    assert (stage / "wheels" / "x-1.0-py3-none-any.whl").stat().st_size == 1_000_000


def test_a_damaged_part_is_refused_with_what_to_do(tmp_path, monkeypatch):
    stage, _ = packed(tmp_path, monkeypatch)
    (stage / "part-02").write_bytes(b"x" * 10)
    with pytest.raises(SystemExit, match="part-02 is damaged or from another pack: carry it again"):
        carry.join(stage)


def test_plan_carries_one_part_a_call_and_runs_the_checks_last(tmp_path, monkeypatch):
    _, manifest = packed(tmp_path, monkeypatch)
    calls = carry.plan(manifest)
    assert len(calls) == 3 and all(".gpu_carry/manifest.json" in call for call in calls)
    assert "bash bench/gpu_checks.sh" in calls[-1] and not any("gpu_checks" in call for call in calls[:-1])
