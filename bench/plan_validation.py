"""The memory planner against measured peaks: one training step per config, on the CPU.

    python bench/plan_validation.py                      # all configs, both measurements
    python bench/plan_validation.py --only tiny --modes allocator

Each config runs in a fresh subprocess: set the recipe (+ overrides) up as training does
(harness.session.build_session), then run two optimizer steps of the training loop
(Loop.train_step) on random tokens (the first allocates the optimizer states, the second is the
steady state the planner predicts). What is compared is the *dynamic* part: the memory the
steps add on top of the built model, against `harness.memory.plan(recipe, device="cpu")
.dynamic_bytes` (activations, attention, logits/loss, gradients, optimizer states).

Measurements:

    allocator  (primary; harness.loop_memory.allocator_peak) torch.profiler with profile_memory=True
               records every allocation and free of torch's CPU allocator; the running sum from the
               post-build state gives the exact peak of live tensor bytes, the CPU analogue of
               torch.cuda.max_memory_allocated. Not counted: memory outside torch's allocator
               (oneDNN scratch, Python objects), which the planner does not model either.
    rss        (secondary) the process's peak resident set (VmHWM, reset through
               /proc/self/clear_refs after the model is built, so the load peak does not
               count) minus the RSS before the first step; run with MALLOC_MMAP_THRESHOLD_ at
               128 KiB so that freed tensors go back to the OS at once. Includes the libraries'
               lazily touched pages and glibc's small-block heap: an upper bound.

Configs: the tiny recipe (S2 sdpa at several lengths, full sdpa, both eager kernels, no
checkpointing) and a random-init model of SmolLM2-135M's shape with LoRA r = 64 (S2 and full
attention, chunked and unchunked loss) at 1k/2k/4k tokens; random weights take the same memory
as real ones. Results go to bench/results/plan_validation.json with a machine record.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import current_rss, peak_rss, reset_peak_rss  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "plan_validation.json"
TINY = "recipes/tiny_cpu.toml"


def smol_shape(layers: int = 30) -> str:
    """An init_config override with SmolLM2-135M's shape (random weights take the same memory)."""
    return ("model.init_config={vocab_size=49152, hidden_size=576, intermediate_size=1536, "
            f"num_hidden_layers={layers}, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, "
            "rope_theta=100000.0, tie_word_embeddings=true, bos_token_id=0, eos_token_id=1, pad_token_id=2}")


SMOL = (smol_shape(), "adapter.r=64")  # r = 64 as in the paper and recipes/smollm2_135m_16k.toml
CONFIGS = [  # (name, recipe, overrides, sequence length)
    *[(f"tiny s2-sdpa L={n}", TINY, (), n) for n in (512, 2048, 8192, 16384)],
    ("tiny full-sdpa L=4096", TINY, ("attention.name=\"full\"",), 4096),
    ("tiny s2-sdpa B=4 L=2048", TINY, ("train.micro_batch_size=4",), 2048),
    *[(f"tiny s2-eager L={n}", TINY, ("attention.kernel=\"eager\"",), n) for n in (1024, 2048)],
    *[(f"tiny full-eager L={n}", TINY, ("attention.name=\"full\"", "attention.kernel=\"eager\""), n)
      for n in (1024, 2048)],
    ("tiny s2-sdpa no-ckpt L=4096", TINY, ("train.gradient_checkpointing=false",), 4096),
    ("tiny s2-sdpa dropout=0 L=4096", TINY, ("adapter.dropout=0.0",), 4096),
    ("tiny full fine-tuning (fp32, no LoRA) L=4096", TINY, ('quantization.name="none"', 'adapter.name="none"'), 4096),
    *[(f"smol135m s2-sdpa L={n}", TINY, SMOL, n) for n in (1024, 2048, 4096)],
    ("smol135m full-sdpa L=2048", TINY, (*SMOL, "attention.name=\"full\""), 2048),
    *[(f"smol135m s2-sdpa unchunked L={n}", TINY, (*SMOL, "train.chunked_loss=false"), n) for n in (1024, 2048)],
    # SmolLM2's layer shape with 8 layers at 8k: the recomputed layer, not the loss, makes the peak
    ("smol135m-8-layers s2-sdpa L=8192", TINY, (smol_shape(8), "adapter.r=64"), 8192),
]
MAX_PREDICTED_GIB = 10.0  # skip configs whose predicted peak would exceed this on a shared machine


def overrides_for(config: tuple, length: int) -> list[str]:
    """The config's overrides plus the length, a PI target at least the models' 8k window (the
    rope factor costs no memory), and one micro-batch per step; no CPU tensor pool (harness.cpu_memory):
    what it keeps are freed blocks, not the live tensors validated here."""
    _, _, extra, _ = config
    return [*extra, f"data.max_seq_length={length}", f"position.target_length={max(length, 8192)}",
            "train.grad_accum=1", "train.cpu_cache_mib=0"]


# --------------------------------------------------------------------------- child process

def build(recipe_path: str, overrides: list[str]):
    """The training loop of the recipe (+ overrides, one micro-batch per step), set up as training sets it up."""
    from harness.loop_memory import training_loop
    from harness.recipe import load_recipe

    return training_loop(load_recipe(recipe_path, [*overrides, "train.grad_accum=1"]))


def measure(recipe_path: str, overrides: list[str], mode: str) -> dict:
    import torch

    from harness.loop_memory import allocator_peak, train_steps
    from harness.memory.measure import static_bytes

    os.chdir(ROOT)
    torch.manual_seed(0)
    loop = build(recipe_path, overrides)
    static = static_bytes(loop.built.model)
    started = time.perf_counter()
    if mode == "allocator":
        result = {"allocator_bytes": allocator_peak(loop)}
    else:
        before = current_rss()
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs is not writable)")
        train_steps(loop)
        result = {"rss_bytes": peak_rss() - before}
    return {**result, "static_bytes": static, "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------- parent

def run_child(config: tuple, mode: str) -> dict:
    name, recipe, _, length = config
    command = [sys.executable, __file__, "--child", recipe, mode, "--", *overrides_for(config, length)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=ROOT)
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def predict(config: tuple) -> dict:
    from harness.memory import lora_params, model_shape, plan, resolve_setup, weight_bytes
    from harness.recipe import load_recipe

    name, recipe_path, _, length = config
    recipe = load_recipe(ROOT / recipe_path, overrides_for(config, length))
    result = plan(recipe, device="cpu")
    setup = resolve_setup(recipe, model_shape(recipe), device="cpu", card=None, seq_len=None)
    static = sum(weight_bytes(setup)) + 4 * lora_params(setup.shape, setup.targets, setup.rank)
    return {"predicted_bytes": result.dynamic_bytes, "predicted_static_bytes": static,
            "peak_phase": result.peak_phase,
            "breakdown": {p.name: result.at_peak(p) for p in result.parts if p.dynamic and result.at_peak(p)}}


def benchmark(args) -> list[dict]:
    rows = []
    for config in CONFIGS:
        name, _, _, length = config
        if args.only and not any(word in name for word in args.only):
            continue
        row = {"config": name, "length": length, **predict(config)}
        if row["predicted_bytes"] > MAX_PREDICTED_GIB * 2**30:
            row["skipped"] = f"predicted over {MAX_PREDICTED_GIB} GiB"
        else:
            for mode in args.modes:
                row.update(run_child(config, mode))
        if "allocator_bytes" in row:
            row["error_pct"] = 100 * (row["predicted_bytes"] - row["allocator_bytes"]) / row["allocator_bytes"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "breakdown"}), file=sys.stderr, flush=True)
    return rows


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average": os.getloadavg()}


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Planner (dynamic part) vs one CPU training step: MiB")
    for column in ("config", "predicted", "allocator peak", "error %", "RSS peak", "phase", "static pred / meas"):
        table.add_column(column, justify="left" if column == "config" else "right")
    mib = lambda key, row: f"{row[key] / 2**20:.1f}" if key in row else "-"  # noqa: E731
    for row in rows:
        if "skipped" in row or "error" in row:
            reason = row.get("skipped") or row["error"][:60]
            table.add_row(row["config"], mib("predicted_bytes", row), reason, "", "", "", "")
            continue
        error = f"{row['error_pct']:+.1f}" if "error_pct" in row else "-"
        static = f"{mib('predicted_static_bytes', row)} / {mib('static_bytes', row)}"
        table.add_row(row["config"], mib("predicted_bytes", row), mib("allocator_bytes", row), error,
                      mib("rss_bytes", row), row["peak_phase"], static)
    Console(width=160).print(table)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[], help="run the configs whose name contains one of these")
    parser.add_argument("--modes", nargs="+", choices=("allocator", "rss"), default=["allocator", "rss"])
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=2, metavar=("RECIPE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], args.overrides, args.child[1])))
        return
    info = machine()
    rows = benchmark(args)
    print_table(rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    method = {"allocator": "torch.profiler memory events: peak live CPU-allocator bytes over 2 steps",
              "rss": "VmHWM after clear_refs minus RSS before the steps, MALLOC_MMAP_THRESHOLD_=128KiB"}
    args.output.write_text(json.dumps({"machine": info, "methods": method, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
