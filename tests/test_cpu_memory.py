"""The CPU memory policy: the bounded tensor pool (harness/csrc/cpu_cache.cpp) and its fallback.

Each case runs in a fresh interpreter: the pool is process-wide, and its counters start at zero there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter (repo root on the path); it prints one JSON line last."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_freed_block_serves_the_next_request_of_its_size():
    result = run_python("""
        import json, torch
        from harness.cpu_memory import apply_policy, pool_stats
        said = apply_policy(True, 64)
        before = pool_stats()
        a = torch.full((256, 1024), 3.0)       # 1 MiB: pooled
        address = a.data_ptr(); del a
        b = torch.zeros(256, 1024)             # the same bin: the same block, zeroed as asked
        after = pool_stats()
        print(json.dumps({"said": said, "same": b.data_ptr() == address, "zeros": bool((b == 0).all()),
                          "hits": after.hits - before.hits, "misses": after.misses - before.misses}))
    """)
    assert "64 MiB pool" in result["said"]
    assert result == {**result, "same": True, "zeros": True, "hits": 1, "misses": 1}


def test_the_pool_never_keeps_more_than_its_capacity():
    result = run_python("""
        import json, torch
        from harness.cpu_memory import apply_policy, pool_stats
        apply_policy(True, 16)
        held = [torch.empty(256, 1024) for _ in range(40)]   # 40 x 1 MiB in use
        in_use = pool_stats().in_use
        del held                                              # 40 MiB freed into a 16 MiB pool
        stats = pool_stats()
        small = torch.empty(100)                              # below 64 KiB: malloc's, not pooled
        print(json.dumps({"in_use": in_use, "kept": stats.kept, "evictions": stats.evictions,
                          "in_use_after": stats.in_use, "misses_after_small": pool_stats().misses - stats.misses}))
    """)
    assert result["in_use"] == 40 * 2**20
    assert result["kept"] == 16 * 2**20
    assert result["evictions"] == 24
    assert result["in_use_after"] == 0
    assert result["misses_after_small"] == 0


def test_without_a_compiler_the_run_goes_on_without_the_pool(tmp_path):
    result = run_python("""
        import json, torch
        from harness.cpu_memory import apply_policy, pool_stats
        said = apply_policy(True, 64)
        x = torch.ones(512, 512) @ torch.ones(512, 512)
        print(json.dumps({"said": said, "stats": pool_stats(), "value": float(x[0, 0])}))
    """, CXX=str(tmp_path / "no-such-compiler"), HARNESS_CACHE=str(tmp_path / "cache"))
    assert result["said"].startswith("freed memory returned to the OS; no tensor pool (")
    assert "no-such-compiler" in result["said"]
    assert result["stats"] is None and result["value"] == 512.0


def test_cache_mb_zero_and_release_false_install_no_pool():
    result = run_python("""
        import json
        from harness.cpu_memory import apply_policy, pool_stats
        print(json.dumps({"zero": apply_policy(True, 0), "off": apply_policy(False, 256), "stats": pool_stats()}))
    """)
    assert result == {"zero": "freed memory returned to the OS", "off": "glibc's default malloc policy", "stats": None}


def test_the_profiler_sees_pooled_tensors_as_torch_allocator_reports_them():
    result = run_python("""
        import json, torch
        from torch.profiler import ProfilerActivity, profile
        from harness.cpu_memory import apply_policy
        apply_policy(True, 64)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            a = torch.empty(256, 1000)   # 1,024,000 bytes, pooled in a 1 MiB bin
            del a
        sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        print(json.dumps(sizes))
    """)
    assert result == [1_024_000, -1_024_000]


def test_a_later_run_without_the_pool_empties_the_installed_one():
    result = run_python("""
        import json, torch
        from harness.cpu_memory import apply_policy, pool_stats
        apply_policy(True, 64)
        del [torch.empty(256, 1024) for _ in range(8)][:]   # 8 MiB freed into the pool
        before = pool_stats().kept
        said = apply_policy(True, 0)
        a = torch.empty(256, 1024); del a                  # freed, and not kept
        print(json.dumps({"before": before, "said": said, "after": pool_stats().kept}))
    """)
    assert result == {"before": 8 * 2**20, "said": "freed memory returned to the OS", "after": 0}
