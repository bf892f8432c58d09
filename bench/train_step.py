"""Training engine: tokens/s and peak memory of a training step, bf16 LoRA vs QLoRA vs LongQLoRA.

    python bench/train_step.py                                 # SmolLM2-135M, CPU: 1k, 2k, 4k
    python bench/train_step.py --lengths 512 1024 --steps 1
    python bench/train_step.py --model llama2-7b --gpu-cap-gib 32   # GPU only: 8k tokens

A step is what harness.train's loop runs for one micro-batch with grad_accum 1: forward through
CausalLMLoss, backward, then engine.step() (clip, AdamW, scheduler), with the model, engine and
optimizer wired as harness.train.train wires them. Inputs: batch 1 of L random token ids.
Setups, all from recipes/smollm2_135m_16k.toml (LoRA r64 on all linear layers, PI x2,
gradient checkpointing, chunked loss):

    a  bf16-lora-full    quantization.name="none", model.dtype="bf16", attention.name="full"
    b  qlora-full        NF4 double-quant, attention.name="full"
    c  longqlora         NF4 double-quant + S2 (the recipe as it is)

On the CPU the NF4 compute dtype and the precision resolve to fp32 ("auto"), so (b) and (c)
compute in fp32; (a) keeps bf16 base weights. Where bf16 fails on a CPU, (a) reruns with fp32
weights and its row says so. Each (setup, L) runs in its own subprocess: one warm-up step
(it also allocates the optimizer states), then --steps timed steps; tokens/s is L over their
mean wall time. Memory: the peak RSS over the timed steps on the CPU (VmHWM reset after the
warm-up; RSS includes the Python runtime and libraries), torch.cuda.max_memory_allocated on a
GPU. Ratios are against (a) at the same L. Results: a rich table and
bench/results/train_step.json with a machine record.

--model llama2-7b / llama2-13b swaps in random bf16 weights of that shape (4k window, PI to
the longest length; bench.common.random_llama2_dir) for GPU runs; random weights cost the same
time and memory as real ones.
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

from bench.common import (GB, LLAMA2_SHAPES, RESULTS_DIR, SMOLLM2, child_env, current_rss, emit, gb,  # noqa: E402
                          length_label, llama2_config, llama2_overrides, machine, peak_rss, random_llama2_dir,
                          reset_peak_rss, run_child, write_results)

SETUPS = {  # name -> recipe overrides, in the order of the table; the first is the baseline
    "bf16-lora-full": ('quantization.name="none"', 'model.dtype="bf16"', 'attention.name="full"'),
    "qlora-full": ('attention.name="full"',),
    "longqlora": (),
}
BASELINE = "bf16-lora-full"
FP32_FALLBACK = 'model.dtype="fp32"'
MODELS = ("smollm2-135m", "llama2-7b", "llama2-13b")  # LLaMA2: random bf16 weights (bench.common)
DEFAULT_LENGTHS = {"smollm2-135m": [1024, 2048, 4096], "llama2-7b": [8192], "llama2-13b": [8192]}


# --------------------------------------------------------------------------- child: timed steps

def build(overrides: list[str]):
    """(recipe, engine, batch) wired as harness.train.train wires them, grad_accum 1."""
    import torch

    from harness.cpu_memory import release_freed_memory
    from harness.backends.accelerate_engine import AccelerateEngine
    from harness.loss import CausalLMLoss
    from harness.model import build_model
    from harness.recipe import load_recipe
    from harness.train import hyper_of, make_optimizer, make_scheduler

    recipe = load_recipe(ROOT / SMOLLM2, [*overrides, "train.grad_accum=1"])
    if recipe.train.release_cpu_memory and not torch.cuda.is_available():
        release_freed_memory()
    torch.manual_seed(0)
    built = build_model(recipe, training=True)
    engine = AccelerateEngine()
    engine.setup()
    hyper = dataclasses.replace(hyper_of(recipe), micro_batch_size=1, grad_accum=1)
    module = CausalLMLoss(built.model, chunked=recipe.train.chunked_loss)
    engine.prepare(module, lambda params: make_optimizer(recipe, engine, hyper, params),
                   lambda optimizer: make_scheduler(recipe, optimizer, 100), hyper)
    return recipe, engine, built.model


def random_batch(model, length: int, device) -> dict:
    import torch

    vocab = model.get_output_embeddings().out_features
    ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(length, device=device)[None]}


def train_step(engine, batch: dict) -> float:
    """harness.train.Loop._optimizer_step for one micro-batch; returns the loss."""
    import torch

    engine.module.train()
    with engine.autocast():
        loss = engine.module(**batch)
    engine.backward(loss, sync=True)
    engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return loss.item()


def measure(model_name: str, overrides: list[str], length: int, steps: int, gpu_cap_gib: float | None) -> dict:
    """Child process: one warm-up step, then `steps` timed ones; their times and peak memory."""
    overrides = [*model_overrides(model_name, length), *overrides, f"data.max_seq_length={length}"]
    cap_gpu_memory(gpu_cap_gib)
    recipe, engine, model = build(overrides)
    return timed_steps(engine, model, length, steps)


def model_overrides(model_name: str, target_length: int) -> tuple[str, ...]:
    """SmolLM2 (the recipe's own model) or a LLaMA2 shape, its random weights built on first use."""
    if model_name == "smollm2-135m":
        return ()
    return llama2_overrides(random_llama2_dir(model_name), target_length)


def cap_gpu_memory(gib: float | None) -> None:
    """torch.cuda.set_per_process_memory_fraction: this process may allocate `gib` GiB of the card."""
    import torch

    if torch.cuda.is_available() and gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / torch.cuda.mem_get_info()[1]))


def timed_steps(engine, model, length: int, steps: int) -> dict:
    """A warm-up step (first-call kernels, optimizer states), then `steps` timed ones at `length`."""
    import torch

    cuda = torch.cuda.is_available()
    batch = random_batch(model, length, engine.device)
    try:
        train_step(engine, batch)
        if cuda:
            torch.cuda.empty_cache()  # what an earlier, longer or shorter, step left cached
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        before = torch.cuda.memory_allocated() if cuda else current_rss()
        seconds, losses = [], []
        for _ in range(steps):
            started = time.perf_counter()
            losses.append(train_step(engine, batch))
            seconds.append(time.perf_counter() - started)
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM"}
    return {"status": "ok", "step_s": seconds, "mean_step_s": statistics.mean(seconds),
            "tokens_per_s": length / statistics.mean(seconds), "losses": losses, "before_bytes": before,
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss(),
            "weights_dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
            "precision": engine.hyper.precision}


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
    overrides = list(SETUPS[setup])
    result = run_once(overrides, length, args)
    if setup == BASELINE and result["status"].startswith("error") and not args.cuda:
        failure = result["status"]
        result = {**run_once([*overrides, FP32_FALLBACK], length, args), "bf16_failure": failure}
    return result


def run_once(overrides: list[str], length: int, args) -> dict:
    command = [sys.executable, __file__, "--child", str(length), "--steps", str(args.steps), "--model", args.model]
    if args.gpu_cap_gib:
        command += ["--gpu-cap-gib", str(args.gpu_cap_gib)]
    command += ["--", *overrides]
    return run_child(command, env=child_env(glibc_defaults=True), budget_bytes=args.budget_gb * GB,
                     timeout_s=args.timeout_min * 60)


def add_ratios(rows: list[dict]) -> None:
    base = {r["length"]: r for r in rows if r["setup"] == BASELINE and r["status"] == "ok"}
    for row in rows:
        reference = base.get(row["length"])
        if reference and row["status"] == "ok":
            row["tokens_per_s_vs_a"] = row["tokens_per_s"] / reference["tokens_per_s"]
            row["memory_vs_a"] = row["peak_bytes"] / reference["peak_bytes"]


def _summary(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    return (f"{row['tokens_per_s']:.1f} tok/s, step {row['mean_step_s']:.1f} s, peak {gb(row['peak_bytes'])} GB, "
            f"{row['weights_dtype']} weights, loss {row['losses'][-1]:.2f}")


def print_table(rows: list[dict], record: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    memory = "max_memory_allocated" if args.cuda else "peak RSS"
    table = Table(title=f"Training step ({args.model}, B=1, warm-up + mean of {args.steps}), {record['device']}")
    for column in ("L", "setup", "weights", "step (s)", "tokens/s", "tokens/s vs a", f"{memory} (GB)",
                   "memory vs a"):
        table.add_column(column, justify="right" if column not in ("setup", "weights") else "left")
    letters = dict(zip(SETUPS, "abc"))
    for row in rows:
        name = f"({letters[row['setup']]}) {row['setup']}"
        if row["status"] != "ok":
            table.add_row(length_label(row["length"]), name, row["status"], *[""] * 5)
            continue
        weights = row["weights_dtype"] + (" (bf16 failed)" if "bf16_failure" in row else "")
        table.add_row(length_label(row["length"]), name, weights, f"{row['mean_step_s']:.1f}",
                      f"{row['tokens_per_s']:.1f}", _ratio(row, "tokens_per_s_vs_a"), gb(row["peak_bytes"]),
                      _ratio(row, "memory_vs_a"))
    Console(width=140).print(table)


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if key in row else ""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="smollm2-135m")
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    parser.add_argument("--lengths", type=int, nargs="+", help="default: 1k 2k 4k (SmolLM2), 8k (LLaMA2-7B)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    parser.add_argument("--budget-gb", type=float, default=20.0, help="host memory budget of one run (GB)")
    parser.add_argument("--timeout-min", type=float, default=15.0, help="time limit of one run (minutes)")
    parser.add_argument("--gpu-cap-gib", type=float, help="GPU runs: torch.cuda.set_per_process_memory_fraction")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "train_step.json")
    parser.add_argument("--child", type=int, metavar="LENGTH", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        emit(measure(args.model, args.overrides, args.child, args.steps, args.gpu_cap_gib))
        return
    record = machine()
    args.cuda = "CPU" not in record["device"]
    if args.model != "smollm2-135m" and not args.cuda:
        parser.error(f"--model {args.model} is a GPU benchmark (a step on this CPU would take hours)")
    args.lengths = sorted(args.lengths or DEFAULT_LENGTHS[args.model])
    rows = benchmark(args)
    print_table(rows, record, args)
    llama2 = llama2_config(args.model) if args.model in LLAMA2_SHAPES else None
    config = {"model": args.model, "recipe": SMOLLM2, "model_config": llama2,
              "setups": {name: list(SETUPS[name]) for name in args.setups}, "lengths": args.lengths,
              "batch": 1, "steps": args.steps, "warmup_steps": 1, "gpu_cap_gib": args.gpu_cap_gib,
              "step": "forward (CausalLMLoss) + backward + engine.step (clip, AdamW, scheduler)",
              "memory": "CPU: peak RSS over the timed steps (VmHWM reset after the warm-up); "
                        "GPU: max_memory_allocated over the timed steps"}
    write_results(args.output, record, config, rows)


if __name__ == "__main__":
    main()
