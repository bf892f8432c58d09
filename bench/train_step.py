"""Training engine: tokens/s and peak memory of a training step, bf16 LoRA vs QLoRA vs LongQLoRA.

    python bench/train_step.py                                 # SmolLM2-135M, CPU: 1k, 4k, 16k
    python bench/train_step.py --lengths 512 1024 --steps 1
    python bench/train_step.py --model llama2-7b --gpu-cap-gib 32   # GPU only: 8k tokens
    python bench/train_step.py --model llama-tiny --lengths 512 --steps 1   # a smoke run, seconds on a CPU

A step is what harness.loop's Loop runs for one micro-batch with grad_accum 1: forward through
CausalLMLoss, backward, then engine.step() (clip, AdamW, scheduler), with the model, engine and
optimizer wired as harness.session.build_session wires them. Inputs: batch 1 of L random token ids.
Setups, from recipes/smollm2_135m_16k.toml (LoRA r64 on all linear layers, PI x2, gradient
checkpointing, chunked loss) unless said:

    a  bf16-lora-full    quantization.name="none", model.dtype="bf16", attention.name="full"
    b  qlora-full        NF4 double-quant, attention.name="full"
    c  longqlora         NF4 double-quant + S2 (the recipe as it is)
    d  longqlora-no-pool c with train.cpu_cache_mib=0: freed memory straight back to the OS (harness.cpu_memory)
    e  peft-plain        no harness code (bench.memory.build_peft_plain): transformers + peft QLoRA as a
                         user writes it (NF4 double quant, fp32 compute, sdpa, checkpointing, LoRA r64
                         all-linear, dropout 0.05, full logits), torch AdamW, glibc's malloc defaults

On the CPU the NF4 compute dtype and the precision resolve to fp32 ("auto"), so (b)-(e) compute
in fp32; (a) keeps bf16 base weights (emulated on CPUs without AVX512-BF16: minutes a step, so
the CPU default is --setups longqlora longqlora-no-pool peft-plain, the GPU's (a)-(c)). Where bf16 fails on a CPU,
(a) reruns with fp32 weights and its row says so. Each (setup, L) runs in its own subprocess: one
warm-up step (it also allocates the optimizer states), then --steps timed steps; tokens/s is L
over their mean wall time. Memory: the peak RSS over the timed steps on the CPU (VmHWM reset
after the warm-up; RSS includes the Python runtime and libraries), torch.cuda.max_memory_allocated
on a GPU. Then one more step under torch.profiler (--no-profile skips it): the GEMM share is the
self time of aten::mm / addmm / bmm / baddbmm over the step's total self CPU time, and "with
attention" adds the fused attention kernels (their matrix products are inside them); 1 / share is
the step's time in units of its own GEMMs. Ratios are against the baseline at the same L: (a),
or (e) where (a) is not run. Results: a rich table and bench/results/train_step.json with a
machine record (load average included; a warning above 1.5).

--model llama2-7b / llama2-13b swaps in random bf16 weights of that shape (4k window, PI to
the longest length; bench.common.random_llama2_dir) for GPU runs; random weights cost the same
time and memory as real ones. --model llama-tiny is bench.common's 2-layer LLaMA2-shaped model:
the GPU runs' code on a CPU in seconds (bench/gpu_checks.sh --rehearse, tests/test_bench_smoke.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (GB, LLAMA2_SHAPES, RESULTS_DIR, SMOLLM2, SMOLLM2_TARGET, child_env, current_rss, emit, gb,  # noqa: E402
                          length_label, llama2_config, llama2_overrides, machine, peak_rss, random_llama2_dir,
                          reset_peak_rss, run_child, warn_load, write_results)

SETUPS = {  # name -> recipe overrides (None: not the harness), in the order of the table
    "bf16-lora-full": ('quantization.name="none"', 'model.dtype="bf16"', 'attention.name="full"'),
    "qlora-full": ('attention.name="full"',),
    "longqlora": (),
    "longqlora-no-pool": ("train.cpu_cache_mib=0",),
    "peft-plain": None,
}
BASELINES = ("bf16-lora-full", "peft-plain")  # the first one measured is the ratios' baseline
CPU_SETUPS = ("longqlora", "longqlora-no-pool", "peft-plain")
GPU_SETUPS = ("bf16-lora-full", "qlora-full", "longqlora")  # no pool on a GPU; the peer is SmolLM2's
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_flash_attention_forward",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_flash_attention_backward",
                 "aten::_efficient_attention_forward", "aten::_efficient_attention_backward")
FP32_FALLBACK = 'model.dtype="fp32"'
MODELS = ("smollm2-135m", "llama2-7b", "llama2-13b", "llama-tiny")  # LLaMA2: random bf16 weights (bench.common)
GPU_ONLY_MODELS = ("llama2-7b", "llama2-13b")
DEFAULT_LENGTHS = {"smollm2-135m": [1024, 4096, 16384], "llama2-7b": [8192], "llama2-13b": [8192], "llama-tiny": [512]}


# --------------------------------------------------------------------------- child: timed steps

def build(overrides: list[str]):
    """(recipe, loop, model): a session set up as harness.session.build_session sets it up, batch 1, grad_accum 1."""
    from harness.loop import Loop
    from harness.recipe import load_recipe
    from harness.session import build_session

    recipe = load_recipe(ROOT / SMOLLM2, [*overrides, "train.grad_accum=1", "train.micro_batch_size=1"])
    session = build_session(recipe, with_data=False, steps=100)
    return session.recipe, Loop(session), session.built.model


def train_step(loop, batch: dict) -> float:
    """One optimizer step of the training loop on `batch`; returns the loss."""
    return loop.train_step(iter([batch]))[0]


def measure(model_name: str, setup: str, extra: list[str], length: int, steps: int, gpu_cap_gib: float | None,
            profile: bool) -> dict:
    """Child process: one warm-up step, then `steps` timed ones, then one profiled where asked."""
    import torch

    from harness.loop_memory import random_batch

    cap_gpu_memory(gpu_cap_gib)
    if SETUPS[setup] is None:
        step, model, precision = *build_peer(), "fp32"
    else:
        overrides = [*model_overrides(model_name, length), *SETUPS[setup], *extra, f"data.max_seq_length={length}"]
        recipe, loop, model = build(overrides)
        step, precision = (lambda batch: train_step(loop, batch)), loop.engine.step_config.precision
    vocab = model.get_output_embeddings().out_features
    batch = random_batch(vocab, 1, length, torch.Generator().manual_seed(0), model.device)
    result = timed_steps(step, batch, steps)
    result.update(weights_dtype=str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
                  precision=precision)
    if profile and result["status"] == "ok" and not torch.cuda.is_available():
        result.update(gemm_share(step, batch))
    return result


def build_peer():
    """(step, model) of bench.memory's plain transformers + peft QLoRA with torch's AdamW: no harness code."""
    import torch

    from bench.memory import build_peft_plain

    loss_of, model = build_peft_plain()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)

    def step(batch: dict) -> float:
        model.train()
        loss = loss_of(batch["input_ids"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, model


def gemm_share(step, batch: dict) -> dict:
    """One step under torch.profiler: the self CPU time of its GEMMs and attention kernels, and their shares."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        step(batch)
    events = profiled.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    gemm = sum(event.self_cpu_time_total for event in events if event.key in GEMM_OPS)
    attention = sum(event.self_cpu_time_total for event in events if event.key in ATTENTION_OPS)
    return {"profiled_s": total / 1e6, "gemm_s": gemm / 1e6, "attention_kernel_s": attention / 1e6,
            "gemm_share": gemm / total, "gemm_attention_share": (gemm + attention) / total}


def model_overrides(model_name: str, target_length: int) -> tuple[str, ...]:
    """SmolLM2 (the recipe's own model) or a LLaMA2 shape, its random weights built on first use."""
    if model_name == "smollm2-135m":
        return (f"position.target_length={max(target_length, SMOLLM2_TARGET)}",)
    return llama2_overrides(random_llama2_dir(model_name), target_length)


def cap_gpu_memory(gib: float | None) -> None:
    """torch.cuda.set_per_process_memory_fraction: this process may allocate `gib` GiB of the card."""
    import torch

    if torch.cuda.is_available() and gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / torch.cuda.mem_get_info()[1]))


def timed_steps(step, batch: dict, steps: int) -> dict:
    """A warm-up step (first-call kernels, optimizer states), then `steps` timed ones."""
    import torch

    from harness.cpu_memory import pool_stats

    cuda = torch.cuda.is_available()
    length = batch["input_ids"].shape[1]
    try:
        step(batch)
        if cuda:
            torch.cuda.empty_cache()  # what an earlier, longer or shorter, step left cached
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
            pool_stats(reset_peak=True)
        before = torch.cuda.memory_allocated() if cuda else current_rss()
        seconds, losses = [], []
        for _ in range(steps):
            started = time.perf_counter()
            losses.append(step(batch))
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM"}
    pool = pool_stats()  # the harness's CPU tensor pool, where installed (harness.cpu_memory)
    return {"status": "ok", "step_s": seconds, "mean_step_s": statistics.mean(seconds),
            "tokens_per_s": length / statistics.mean(seconds), "losses": losses, "before_bytes": before,
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss(),
            "pool": dataclasses.asdict(pool) if pool else None}


# --------------------------------------------------------------------------- parent

def benchmark(args) -> list[dict]:
    rows = []
    for length in args.lengths:
        for setup in args.setups:
            row = {"setup": setup, "length": length, **run_setup(setup, length, args)}
            rows.append(row)
            print(f"L={length:>6} {setup:<15} {_summary(row)}", file=sys.stderr, flush=True)
    add_ratios(rows)
    return rows


def run_setup(setup: str, length: int, args) -> dict:
    """One (setup, L) child; bf16 that fails on a CPU is measured again with fp32 weights."""
    result = run_once(setup, [], length, args)
    if setup == "bf16-lora-full" and result["status"].startswith("error") and not args.cuda:
        failure = result["status"]
        result = {**run_once(setup, [FP32_FALLBACK], length, args), "bf16_failure": failure}
    return result


def run_once(setup: str, extra: list[str], length: int, args) -> dict:
    command = [sys.executable, __file__, "--child", str(length), "--setup", setup, "--steps", str(args.steps),
               "--model", args.model]
    if args.gpu_cap_gib:
        command += ["--gpu-cap-gib", str(args.gpu_cap_gib)]
    if not args.profile:
        command += ["--no-profile"]
    command += ["--", *extra]
    # The harness sets its CPU policy itself at run time; no setup inherits MALLOC_* settings from the shell.
    return run_child(command, env=child_env(glibc_defaults=True), budget_bytes=args.budget_gb * GB,
                     timeout_s=args.timeout_min * 60)


def add_ratios(rows: list[dict]) -> None:
    """tokens/s and memory against the first baseline (bf16-lora-full, else peft-plain) measured at each L."""
    for length in {row["length"] for row in rows}:
        at_length = [row for row in rows if row["length"] == length]
        base = next((row for name in BASELINES for row in at_length if row["setup"] == name and row["status"] == "ok"),
                    None)
        for row in at_length:
            if base and row["status"] == "ok":
                row["baseline"] = base["setup"]
                row["tokens_per_s_vs_baseline"] = row["tokens_per_s"] / base["tokens_per_s"]
                row["memory_vs_baseline"] = row["peak_bytes"] / base["peak_bytes"]


def _summary(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    return (f"{row['tokens_per_s']:.1f} tok/s, step {row['mean_step_s']:.1f} s, peak {gb(row['peak_bytes'])} GB, "
            f"{row['weights_dtype']} weights, loss {row['losses'][-1]:.2f}")


def print_table(rows: list[dict], record: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    memory = "max_memory_allocated" if args.cuda else "peak RSS"
    baseline = next((name for name in BASELINES if name in args.setups), "")
    table = Table(title=f"Training step ({args.model}, B=1, warm-up + mean of {args.steps}), {record['device']}, "
                        f"load {record['load_average'][0]:.2f}")
    for column in ("L", "setup", "weights", "step (s)", "tokens/s", f"tokens/s vs {baseline}", f"{memory} (GB)",
                   f"memory vs {baseline}", "GEMM share", "with attention"):
        table.add_column(column, justify="right" if column not in ("setup", "weights") else "left")
    letters = dict(zip(SETUPS, "abcde"))
    for row in rows:
        name = f"({letters[row['setup']]}) {row['setup']}"
        if row["status"] != "ok":
            table.add_row(length_label(row["length"]), name, row["status"], *[""] * 7)
            continue
        weights = row["weights_dtype"] + (" (bf16 failed)" if "bf16_failure" in row else "")
        table.add_row(length_label(row["length"]), name, weights, f"{row['mean_step_s']:.1f}",
                      f"{row['tokens_per_s']:.1f}", _ratio(row, "tokens_per_s_vs_baseline"), gb(row["peak_bytes"]),
                      _ratio(row, "memory_vs_baseline"), _percent(row, "gemm_share"),
                      _percent(row, "gemm_attention_share"))
    Console(width=160).print(table)


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if key in row else ""


def _percent(row: dict, key: str) -> str:
    return f"{row[key]:.0%}" if key in row else ""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="smollm2-135m")
    parser.add_argument("--setups", nargs="+", choices=SETUPS,
                        help=f"default: {' '.join(GPU_SETUPS)} on a GPU, {' '.join(CPU_SETUPS)} on a CPU")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="default: 1k 4k 16k (SmolLM2), 8k (LLaMA2), 512 (llama-tiny)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    parser.add_argument("--budget-gb", type=float, default=20.0, help="host memory budget of one run (GB)")
    parser.add_argument("--timeout-min", type=float, default=15.0, help="time limit of one run (minutes)")
    parser.add_argument("--gpu-cap-gib", type=float, help="GPU runs: torch.cuda.set_per_process_memory_fraction")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "train_step.json")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the profiled step (the GEMM share columns)")
    parser.add_argument("--child", type=int, metavar="LENGTH", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        emit(measure(args.model, args.setup, args.overrides, args.child, args.steps, args.gpu_cap_gib, args.profile))
        return
    record = machine()
    warn_load("at the start")
    args.cuda = "CPU" not in record["device"]
    args.setups = args.setups or [setup for setup in (GPU_SETUPS if args.cuda else CPU_SETUPS)
                                  if setup != "peft-plain" or args.model == "smollm2-135m"]
    if "peft-plain" in args.setups and args.model != "smollm2-135m":
        parser.error("--setups peft-plain: the plain peft peer is SmolLM2-135M's (bench.memory.build_peft_plain)")
    if args.model in GPU_ONLY_MODELS and not args.cuda:
        parser.error(f"--model {args.model} is a GPU benchmark (a step on this CPU would take hours)")
    args.lengths = sorted(args.lengths or DEFAULT_LENGTHS[args.model])
    rows = benchmark(args)
    print_table(rows, record, args)
    llama2 = llama2_config(args.model) if args.model in LLAMA2_SHAPES else None
    config = {"model": args.model, "recipe": SMOLLM2, "model_config": llama2,
              "setups": {name: list(SETUPS[name] or ["bench.memory.build_peft_plain"]) for name in args.setups},
              "lengths": args.lengths,
              "batch": 1, "steps": args.steps, "warmup_steps": 1, "gpu_cap_gib": args.gpu_cap_gib,
              "step": "forward (CausalLMLoss) + backward + engine.step (clip, AdamW, scheduler)",
              "memory": "CPU: peak RSS over the timed steps (VmHWM reset after the warm-up); "
                        "GPU: max_memory_allocated over the timed steps",
              "gemm_share": f"self CPU time of {', '.join(GEMM_OPS)} over the profiled step's total; "
                            f"with attention: plus {', '.join(ATTENTION_OPS)}",
              "load_end": warn_load("at the end")}
    write_results(args.output, record, config, rows)


if __name__ == "__main__":
    main()
