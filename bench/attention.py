"""Full causal attention vs S2-Attn: forward+backward time and peak memory.

    python bench/attention.py --lengths 2048 4096 8192 16384 --repeats 3

Shape: LLaMA2-7B attention (32 query heads x 128 dim, 32 KV heads), batch 1, float32 on CPU
(bfloat16 on CUDA). q, k, v are laid out (B, L, H, D) in memory and viewed as (B, H, L, D), as
the transformers LLaMA attention hands them over. Methods:

    full      torch SDPA, is_causal=True (what transformers' "sdpa" attention runs)
    s2-sdpa   shift_short_attention(kernel="sdpa"), G = ratio * L
    s2-eager  shift_short_attention(kernel="eager"): dense (L, L) masks, the readable reference
    s2-flash  shift_short_attention(kernel="flash"): flash-attn varlen (CUDA, where it is installed)

Time: one subprocess per length runs every method on the same inputs, `warmup` times each, then
`repeats` rounds that take turns between the methods, so that load from other processes on a
shared machine hits all methods alike. Reported: the median wall time of forward + backward,
and its median process CPU time (all threads).

Memory: one subprocess per (method, length) runs forward + backward once. On CPU it reports the
peak RSS (getrusage ru_maxrss) minus the RSS once torch, q, k, v and the output gradient exist,
i.e. what forward + backward adds. These subprocesses run with MALLOC_MMAP_THRESHOLD_ fixed at
128 KiB so that glibc returns each freed tensor to the OS at once and peak RSS tracks the peak of
live tensor memory, not glibc's cached heap (the timing runs keep glibc's defaults). On CUDA:
torch.cuda.max_memory_allocated minus the allocation after the inputs.

Rows whose estimated memory exceeds --memory-limit-gb are "skipped (memory)". The table and
bench/results/attention.json give S2 / full ratios of time and memory.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import current_rss  # noqa: E402
from bench.common import machine as common_machine  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 32, 128
CUDA = torch.cuda.is_available()
FLASH = CUDA and importlib.util.find_spec("flash_attn") is not None
METHODS = ("full", "s2-sdpa", "s2-eager") + (("s2-flash",) if FLASH else ())
RESULTS = Path(__file__).resolve().parent / "results" / "attention.json"
DEVICE, DTYPE = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)


def attention(method: str, ratio: float):
    """fn(q, k, v) -> (B, L, H, D) for `method`."""
    from harness.backends.s2 import shift_short_attention
    from harness.policy import s2_group_size

    if method == "full":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    kernel = method.removeprefix("s2-")
    return lambda q, k, v: shift_short_attention(q, k, v, s2_group_size(q.shape[2], ratio), kernel=kernel)


def estimated_bytes(method: str, length: int) -> int:
    """Rough peak of forward + backward: eager keeps ~3 dense (H, L, L) tensors alive."""
    itemsize = DTYPE.itemsize
    activations = 8 * length * HEADS * HEAD_DIM * itemsize  # outputs, gradients, copies
    dense = 3 * HEADS * length * length * itemsize if method == "s2-eager" else 0
    return activations + dense


def inputs(length: int):
    """q, k, v (B, H, L, D) views of (B, L, H, D) memory, requiring grad, and the output gradient."""
    torch.manual_seed(0)
    qkv = [torch.randn(1, length, heads, HEAD_DIM, device=DEVICE, dtype=DTYPE).transpose(1, 2).requires_grad_()
           for heads in (HEADS, KV_HEADS, KV_HEADS)]
    return qkv, torch.randn(1, length, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)


def step(fn, qkv, grad_out) -> None:
    """One forward + backward."""
    for x in qkv:
        x.grad = None
    fn(*qkv).backward(grad_out)
    if CUDA:
        torch.cuda.synchronize()


def time_methods(length: int, methods: list[str], repeats: int, warmup: int, ratio: float) -> dict:
    """Child process: median wall and CPU seconds of forward + backward per method."""
    qkv, grad_out = inputs(length)
    fns = {method: attention(method, ratio) for method in methods}
    for method in methods:
        for _ in range(warmup):
            step(fns[method], qkv, grad_out)
    walls, cpus = {m: [] for m in methods}, {m: [] for m in methods}
    for _ in range(repeats):
        for method in methods:  # take turns, so background load hits every method alike
            wall, cpu = time.perf_counter(), time.process_time()
            step(fns[method], qkv, grad_out)
            walls[method].append(time.perf_counter() - wall)
            cpus[method].append(time.process_time() - cpu)
    return {m: {"seconds": statistics.median(walls[m]), "times": walls[m],
                "cpu_seconds": statistics.median(cpus[m])} for m in methods}


def peak_memory(method: str, length: int, ratio: float) -> dict:
    """Child process: bytes that one forward + backward adds at its peak."""
    qkv, grad_out = inputs(length)
    fn = attention(method, ratio)
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = current_rss()
    step(fn, qkv, grad_out)
    peak = torch.cuda.max_memory_allocated() if CUDA else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": peak - baseline}


def child(args, *extra: str, env: dict | None = None) -> dict:
    """Run this script with `extra` arguments in a subprocess; its last stdout line is JSON."""
    command = [sys.executable, __file__, "--ratio", str(args.ratio), "--repeats", str(args.repeats),
               "--warmup", str(args.warmup), *extra]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    if done.returncode:
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        return {"error": lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark(args) -> list[dict]:
    rows = []
    for length in args.lengths:
        fits = [m for m in METHODS if estimated_bytes(m, length) <= args.memory_limit_gb * 2**30]
        timings = child(args, "--child-time", str(length), *fits)
        for method in METHODS:
            row = {"length": length, "method": method}
            if method not in fits:
                row["skipped"] = "memory"
            elif "error" in timings:
                row.update(timings)
            else:
                row.update(timings[method])
                row.update(child(args, "--child-memory", method, str(length),
                                 env={"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}))
            rows.append(row)
            print(f"L={length:>6} {method:<9} {row}", file=sys.stderr, flush=True)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """S2 / full ratios of time and memory at the same length."""
    full = {row["length"]: row for row in rows if row["method"] == "full" and "peak_bytes" in row}
    for row in rows:
        base = full.get(row["length"])
        if base and "peak_bytes" in row:
            row["time_vs_full"] = row["seconds"] / base["seconds"]
            row["cpu_time_vs_full"] = row["cpu_seconds"] / base["cpu_seconds"]
            row["memory_vs_full"] = row["peak_bytes"] / base["peak_bytes"]


def machine() -> dict:
    return {**common_machine(), "dtype": str(DTYPE).removeprefix("torch.")}


def print_table(rows: list[dict], info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"forward+backward, B=1, {HEADS}x{HEAD_DIM} heads, {info['dtype']}, {info['device']}")
    for column in ("L", "method", "wall (s)", "wall / full", "cpu (s)", "cpu / full", "peak (MiB)",
                   "memory / full"):
        table.add_column(column, justify="right")
    for row in rows:
        if "peak_bytes" not in row:
            reason = f"skipped ({row['skipped']})" if "skipped" in row else f"error: {row['error']}"
            table.add_row(str(row["length"]), row["method"], reason, *[""] * 5)
            continue
        table.add_row(str(row["length"]), row["method"], f"{row['seconds']:.3f}", f"{row['time_vs_full']:.2f}",
                      f"{row['cpu_seconds']:.2f}", f"{row['cpu_time_vs_full']:.2f}",
                      f"{row['peak_bytes'] / 2**20:.0f}", f"{row['memory_vs_full']:.2f}")
    Console(width=120).print(table)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--ratio", type=float, default=0.25, help="group size = ratio * L")
    parser.add_argument("--memory-limit-gb", type=float, default=12.0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child-time", nargs="+", metavar="LENGTH METHOD", help=argparse.SUPPRESS)
    parser.add_argument("--child-memory", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_time:
        length, *methods = args.child_time
        print(json.dumps(time_methods(int(length), methods, args.repeats, args.warmup, args.ratio)))
        return
    if args.child_memory:
        method, length = args.child_memory
        print(json.dumps(peak_memory(method, int(length), args.ratio)))
        return
    info = machine()  # load average before the runs: other processes may share the CPU
    rows = benchmark(args)
    print_table(rows, info)
    config = {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "batch": 1, "ratio": args.ratio,
              "repeats": args.repeats, "warmup": args.warmup,
              "time": "median wall (and process CPU) seconds of forward+backward, methods interleaved",
              "memory": "CPU: peak RSS minus RSS after inputs, MALLOC_MMAP_THRESHOLD_=131072; "
                        "CUDA: max_memory_allocated minus inputs"}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": info, "config": config, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
