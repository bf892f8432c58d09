"""CPU memory policy: freed memory goes back to the OS, and a bounded pool keeps what is reused.

glibc's malloc raises its mmap threshold after every large free, up to 32 MiB, so the
multi-MiB activations of a long sequence soon come from the heap, and freed heap memory
mostly stays with the process: 5.3 GB peak RSS for 0.65 GB of live tensors (SmolLM2-135M,
NF4 + LoRA + S2, one 2k-token step). A fixed 64 KiB threshold (`train.release_cpu_memory`)
serves every block of 64 KiB or more by mmap, which munmap returns on free; but then every
activation is a fresh mapping, and its page faults and zeroing cost 40% of the step.

`train.cpu_cache_mib` puts a pool in front of torch's CPU allocator (csrc/cpu_cache.cpp): a
freed block of 64 KiB or more is kept for the next request of its size (64 KiB bins), and the
oldest kept blocks are handed back once more than the capacity is kept. A step asks for the
same few sizes layer after layer, so a few hundred MiB serve most requests. The pool is a
small C++ file compiled once per torch build (about a second with g++) into
$HARNESS_CACHE/cpu_cache/; where no compiler works the run goes on without it, and says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 64 * 1024
POOL_MIN_BYTES = MMAP_THRESHOLD_BYTES  # smaller blocks stay in malloc's heap, which reuses them
SOURCE = Path(__file__).with_name("csrc") / "cpu_cache.cpp"
MiB = 2**20


@dataclass(frozen=True)
class PoolStats:
    kept: int  # bytes kept for reuse now
    in_use: int  # pooled bytes held by tensors now
    peak: int  # the largest in_use + kept since the last reset
    kept_at_peak: int
    hits: int
    misses: int
    evictions: int


def apply_recipe_policy(train) -> str | None:
    """The policy of a recipe's [train] table (release_cpu_memory, cpu_cache_mib) for a CPU run:
    set before the model loads; returns what it set, None where CUDA computes."""
    import torch

    if torch.cuda.is_available():
        return None
    return apply_policy(train.release_cpu_memory, train.cpu_cache_mib)


def apply_policy(release: bool, cache_mb: int) -> str:
    """Set the CPU policy of this process; returns what it set, for the run's log."""
    if "pool" in _LOADED and not (release and cache_mb):  # an earlier run's pool (same process) keeps nothing now
        _LOADED["pool"].harness_cpu_cache_install(ctypes.c_size_t(0), ctypes.c_size_t(POOL_MIN_BYTES))
    if not release:
        return "glibc's default malloc policy"
    returned = release_freed_memory()
    if not cache_mb:
        return "freed memory returned to the OS" if returned else "glibc's default malloc policy (not glibc)"
    pool, why = _pool_library()
    if pool is None:
        return f"freed memory returned to the OS; no tensor pool ({why})"
    pool.harness_cpu_cache_install(ctypes.c_size_t(cache_mb * MiB), ctypes.c_size_t(POOL_MIN_BYTES))
    return f"freed memory returned to the OS, a {cache_mb} MiB pool keeps what is reused"


def release_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 64 KiB; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    except (OSError, AttributeError, TypeError):
        return False


def pool_stats(reset_peak: bool = False) -> PoolStats | None:
    """The pool's counters (None where it is not installed); reset_peak restarts `peak`."""
    pool = _LOADED.get("pool")
    if pool is None:
        return None
    values = (ctypes.c_size_t * 7)()
    pool.harness_cpu_cache_stats(values, int(reset_peak))
    return PoolStats(*values)


_LOADED: dict[str, ctypes.CDLL] = {}


def _pool_library() -> tuple[ctypes.CDLL | None, str]:
    """The compiled pool, loaded (built on first use); (None, why) where it cannot be."""
    if "pool" in _LOADED:
        return _LOADED["pool"], ""
    try:
        path = _built_library()
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        return None, str(error).splitlines()[0] if str(error) else type(error).__name__
    _LOADED["pool"] = library
    return library, ""


def _built_library() -> Path:
    import torch

    from harness.base_model import cache_root

    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    key = hashlib.sha256(f"{SOURCE.read_text()}|{torch.__version__}|{torch_dir}|{abi}".encode()).hexdigest()[:16]
    target = cache_root() / "cpu_cache" / key / "libcpu_cache.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) to build harness/csrc/cpu_cache.cpp")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-pthread", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               f"-I{torch_dir / 'include'}", str(SOURCE), f"-L{torch_dir / 'lib'}", "-lc10",
               f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(partial)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if built.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {built.stderr.strip()[-300:]}")
    os.replace(partial, target)  # atomic: a concurrent build publishes the same bytes
    return target
