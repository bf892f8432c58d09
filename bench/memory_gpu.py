"""LLaMA2-7B and 13B at long context on one capped GPU: peak memory and tokens/s of a LongQLoRA step.

    python bench/memory_gpu.py                                  # 7B: 8k 16k 32k, 13B: 12k 16k; 32 GiB cap
    python bench/memory_gpu.py --models llama2-7b --lengths 8192 --cap-gib 24
    python bench/memory_gpu.py --allow-cpu --lengths 256 512      # no GPU: a smoke run of llama-tiny

Weights: random bf16 weights of the published LLaMA2 shapes (bench.common.random_llama2_dir),
loaded by the harness as NF4 double-quant; random weights take the memory and time of real ones.
The training setup is recipes/smollm2_135m_16k.toml's (LoRA r64 on all linear layers, S2 with
1/4 groups, gradient checkpointing, chunked loss) on the LLaMA2 shape, PI 4k -> the model's
longest length (the factor changes neither memory nor time). A step is bench/train_step.py's:
the session harness.session builds (build_session: engine.prepare, the engine's autocast) and one
Loop.train_step on random tokens: forward + backward + AdamW step, batch 1, as training runs it.

One subprocess per model, capped with torch.cuda.set_per_process_memory_fraction (--cap-gib,
the card a user has). Its lengths run shortest first, each with one warm-up step and --steps
timed ones; peak = torch.cuda.max_memory_allocated over the timed steps, with the allocator's
cache emptied before them. A length that runs out of memory ends that model's run. The memory
planner (harness.memory.plan, allocated bytes) gives its prediction beside every row.
Results: a rich table and bench/results/memory_gpu.json with a machine record, rewritten after
each model so that a run cut short keeps what it measured.

Without a GPU, --allow-cpu runs the same code on bench.common's llama-tiny (a LLaMA2-shaped
2-layer model, 4k window: lengths below it are not extended): a smoke run of what the GPU run
does, with the peak RSS over the timed steps for memory and no comparison with the planner.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (GB, LLAMA2_SHAPES, RESULTS_DIR, SMOLLM2, child_env, emit, length_label,  # noqa: E402
                          llama2_config, machine, run_child, write_results)

GIB = 2**30
DEFAULT_LENGTHS = {"llama2-7b": [8192, 16384, 32768], "llama2-13b": [12288, 16384], "llama-tiny": [256, 512]}
GPU_MODELS = ("llama2-7b", "llama2-13b")
CPU_MODELS = ("llama-tiny",)  # --allow-cpu's default
GOALS = {"llama2-7b": 32768, "llama2-13b": 16384}  # the goal: these fit under 32 GiB


# --------------------------------------------------------------------------- child: one model

def measure_model(model_name: str, lengths: list[int], steps: int, cap_gib: float) -> dict:
    """Build the session once for the longest length, then time `lengths` shortest first."""
    import torch

    from bench.train_step import build, cap_gpu_memory, model_overrides, timed_steps, train_step
    from harness.loop_memory import random_batch

    overrides = [*model_overrides(model_name, max(lengths)), f"data.max_seq_length={max(lengths)}"]
    cap_gpu_memory(cap_gib)  # after the random weights exist: drawing them takes the bf16 model
    recipe, loop, model = build(overrides)
    vocab = model.get_output_embeddings().out_features
    built = {"weights_dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
             "precision": loop.engine.step_config.precision}
    rows = []
    for length in lengths:
        batch = random_batch(vocab, 1, length, torch.Generator().manual_seed(0), model.device)
        row = {"model": model_name, "length": length,
               **timed_steps(lambda batch: train_step(loop, batch), batch, steps), **built,
               **planned(recipe, length, cap_gib)}
        rows.append(row)
        print(f"{model_name} L={length}: {_summary(row)}", file=sys.stderr, flush=True)
        if row["status"] != "ok":
            break
    return {"status": "ok", "rows": rows}


def planned(recipe, length: int, cap_gib: float) -> dict:
    """harness.memory.plan's allocated bytes for this step on a `cap_gib` card."""
    try:
        from harness.memory import plan
        result = plan(recipe, gpu_gib=cap_gib, seq_len=length, device="cuda")
    except Exception as error:  # noqa: BLE001 - recorded beside the measurement, not fatal to it
        return {"plan_error": f"{type(error).__name__}: {error}"}
    return {"plan_bytes": result.allocated_bytes, "plan_fits": result.fits}


# --------------------------------------------------------------------------- parent

def benchmark(args, record: dict) -> list[dict]:
    cuda = "CPU" not in record["device"]
    rows = []
    for model_name in args.models:
        lengths = sorted(args.lengths or DEFAULT_LENGTHS[model_name])
        command = [sys.executable, __file__, "--child", model_name, "--steps", str(args.steps),
                   "--cap-gib", str(args.cap_gib), "--lengths", *map(str, lengths)]
        result = run_child(command, env=child_env(glibc_defaults=False), budget_bytes=args.budget_gb * GB,
                           timeout_s=args.timeout_min * 60)
        rows += result["rows"] if "rows" in result else [{"model": model_name, "length": lengths[0], **result}]
        if cuda:  # on the CPU the peak is the process's RSS, not the allocated tensors the planner predicts
            add_errors(rows)
        write_results(args.output, record, config_of(args, cuda), rows)
    return rows


def add_errors(rows: list[dict]) -> None:
    for row in rows:
        if row["status"] == "ok" and "plan_bytes" in row:
            row["plan_error_pct"] = 100 * (row["plan_bytes"] / row["peak_bytes"] - 1)


def config_of(args, cuda: bool = True) -> dict:
    return {"recipe": SMOLLM2, "models": {name: llama2_config(name) for name in args.models},
            "cap_gib": args.cap_gib, "batch": 1, "steps": args.steps, "warmup_steps": 1,
            "step": "Loop.train_step: forward (CausalLMLoss) + backward + engine.step (clip, AdamW, scheduler)",
            "memory": "torch.cuda.max_memory_allocated over the timed steps" if cuda else
                      "CPU smoke run: peak RSS over the timed steps (bench.train_step.timed_steps)"}


def _summary(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    return (f"{row['tokens_per_s']:.0f} tok/s, step {row['mean_step_s']:.2f} s, "
            f"peak {row['peak_bytes'] / GIB:.2f} GiB, loss {row['losses'][-1]:.2f}")


def print_table(rows: list[dict], record: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    cuda = "CPU" not in record["device"]
    where = f"under a {args.cap_gib:g} GiB cap" if cuda else "on the CPU (smoke run)"
    table = Table(title=f"LongQLoRA step {where} (B=1, warm-up + mean of {args.steps}), {record['device']}")
    peak = "peak (GiB)" if cuda else "peak RSS (GiB)"
    for column in ("model", "L", "status", "step (s)", "tokens/s", peak, "planner (GiB)", "planner error"):
        table.add_column(column, justify="left" if column in ("model", "status") else "right")
    for row in rows:
        ok = row["status"] == "ok"
        table.add_row(row["model"], length_label(row["length"]), row["status"],
                      f"{row['mean_step_s']:.2f}" if ok else "", f"{row['tokens_per_s']:.0f}" if ok else "",
                      f"{row['peak_bytes'] / GIB:.2f}" if ok else "",
                      f"{row['plan_bytes'] / GIB:.2f}" if "plan_bytes" in row else row.get("plan_error", ""),
                      f"{row['plan_error_pct']:+.0f}%" if "plan_error_pct" in row else "")
    Console(width=140).print(table)


def goals(rows: list[dict], args) -> None:
    for model_name, length in GOALS.items():
        row = next((r for r in rows if r["model"] == model_name and r["length"] == length), None)
        if row is not None:
            verdict = f"fits ({row['peak_bytes'] / GIB:.2f} GiB)" if row["status"] == "ok" else row["status"]
            print(f"goal {model_name} at {length_label(length)} under {args.cap_gib:g} GiB: {verdict}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=LLAMA2_SHAPES,
                        help=f"default: {' '.join(GPU_MODELS)}; with --allow-cpu on a CPU: {' '.join(CPU_MODELS)}")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="default: 8k 16k 32k (7B), 12k 16k (13B), 256 512 (tiny)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps after the warm-up")
    parser.add_argument("--cap-gib", type=float, default=32.0, help="GPU memory this process may allocate")
    parser.add_argument("--budget-gb", type=float, default=100.0, help="host memory budget of one model's run")
    parser.add_argument("--timeout-min", type=float, default=20.0, help="time limit of one model's run")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "memory_gpu.json")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-run (llama-tiny by default) without a GPU")
    parser.add_argument("--child", choices=LLAMA2_SHAPES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        emit(measure_model(args.child, args.lengths, args.steps, args.cap_gib))
        return
    record = machine()
    cuda = "CPU" not in record["device"]
    if not cuda and not args.allow_cpu:
        parser.error("this is a GPU benchmark: on a CPU, a 7B step at 8k takes hours (--allow-cpu for a smoke run)")
    args.models = args.models or list(GPU_MODELS if cuda else CPU_MODELS)
    rows = benchmark(args, record)
    print_table(rows, record, args)
    goals(rows, args)


if __name__ == "__main__":
    main()
