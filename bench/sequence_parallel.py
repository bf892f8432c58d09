"""Sequences longer than one card: Ulysses sequence parallelism, tiled MLP, and the planner over many cards.

    python bench/sequence_parallel.py                        # the three parts below
    python bench/sequence_parallel.py --parts plan           # the planner table only (seconds)
    python bench/sequence_parallel.py --parts sp --sp-length 16384
    python bench/sequence_parallel.py --parts tiled --tiled-lengths 16384 32768
    python bench/sequence_parallel.py --parts tiled --model llama-tiny --tiled-lengths 512 --results-dir /tmp/sp

Parts:

    sp     The training loop (launch/train.py, DeepSpeed engine, ZeRO-2: launch/deepspeed/zero2_sp.json)
           on a small LLaMA-shaped model (8 heads, d = 256, 4 layers, LongQLoRA: NF4 + LoRA r8 + S2,
           PI to --sp-length) over a public-domain book, 3 steps of one --sp-length sequence: one
           process (engine.sequence_parallel_size = 1) against `deepspeed --num_gpus 2` with
           sequence_parallel_size = 2. The parent samples the RSS of every rank's process (peak per
           rank, libraries and model included); tokens/s is the loop's own (metrics.jsonl, steps 2-3).
           On a 2-core CPU the two ranks share the cores: SP halves what each rank holds, not the time.
           Dropout is off, so the two loss curves are the same function's (float rounding apart).
    tiled  One forward + backward of SmolLM2-135M (recipes/smollm2_135m_16k.toml, PI to L; --model
           llama-tiny: bench.common's small LLaMA2 shape, for smoke runs) at each --tiled-lengths, with
           and without train.tiled_mlp, each in its own process: the step's peak RSS above the built
           model (VmHWM reset after the build), tokens/s, and the CPU planner's prediction of the same
           difference. Rows of other lengths in the results file are kept. The step is bench/memory.py's:
           the session harness.session builds (build_session, engine.prepare) and Loop.train_step without
           engine.step() (bench.memory.forward_backward: forward under engine.autocast() + backward, no
           optimizer step, whose states do not depend on tiling).
    plan   harness.memory.plan for LLaMA2-7B (recipes/llama2_7b_8k.toml) and 13B (llama2_13b_12k.toml),
           LongQLoRA with ZeRO-2 optimizer offload, at 32k-512k on 1, 2, 4, 8 cards of 24, 32 and 80 GB
           (rtx4090-24gb, v100-32gb, a100-80gb), sequence_parallel_size = the number of cards, with and
           without train.tiled_mlp and train.offload_activations: the peak per card, and the longest
           sequence that fits each (multiples of 1024 tokens, up to 16M).

Results: bench/results/sequence_parallel.json (sp and tiled, with a machine record) and
bench/results/sequence_parallel_plan.json (the planner table), under --results-dir, and tables on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (GB, LLAMA2_SHAPES, RESULTS_DIR, SMOLLM2, child_env, current_rss, emit, machine,  # noqa: E402
                          peak_rss, reset_peak_rss, run_child, shown)
from harness.metrics import read_step_records  # noqa: E402

BOOK = ROOT / "recipes" / "data" / "books" / "jack_sheppard.txt"
SMALL_LLAMA = ("model.init_config={vocab_size=260, hidden_size=256, intermediate_size=688, num_hidden_layers=4, "
               "num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096, rope_theta=10000.0, "
               "bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=false}")
PLAN_MODELS = {"llama2-7b": "recipes/llama2_7b_8k.toml", "llama2-13b": "recipes/llama2_13b_12k.toml"}
PLAN_CARDS = {"24 GB": "rtx4090-24gb", "32 GB": "v100-32gb", "80 GB": "a100-80gb"}
PLAN_COUNTS = (1, 2, 4, 8)
PLAN_LENGTHS = (32768, 65536, 131072, 262144, 524288)
PLAN_VARIANTS = {"plain": (), "tiled": ("train.tiled_mlp=true",), "offload": ("train.offload_activations=true",),
                 "tiled+offload": ("train.tiled_mlp=true", "train.offload_activations=true")}
VENV_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- sp: the loop on 1 and 2 ranks

def sp_run(ranks: int, length: int, workdir: Path, port: int) -> dict:
    """3 steps of the training loop; peak RSS of each rank's process and the loop's tokens/s."""
    output = workdir / f"sp{ranks}"
    overrides = ["model.name_or_path=\"random\"", SMALL_LLAMA, f"position.target_length={length}",
                 f"data.max_seq_length={length}", f"data.path=\"{BOOK}\"", "data.mode=\"pack\"", "adapter.dropout=0.0",
                 "train.max_steps=3",
                 "train.grad_accum=1", "train.save_every=0", "train.warmup_steps=0", f"train.output_dir=\"{output}\"",
                 "engine.name=\"deepspeed\"", "engine.deepspeed_config=\"launch/deepspeed/zero2_sp.json\"",
                 f"engine.sequence_parallel_size={ranks}"]
    launcher = [sys.executable] if ranks == 1 else [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks),
                                                    "--master_port", str(port)]
    env = {**child_env(glibc_defaults=False), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks)),
           "PATH": os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")])}
    env.pop("WORLD_SIZE", None)
    started = time.monotonic()
    process = subprocess.Popen([*launcher, "launch/train.py", "recipes/tiny_cpu.toml", *overrides], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    peaks = _watch_ranks(process)
    log = process.stdout.read()
    code = process.wait()
    finished = (output / "final" / "adapter_model.safetensors").is_file()  # a crash at exit still trained
    if code and not finished:
        return {"ranks": ranks, "status": "error", "log_tail": log.strip().splitlines()[-8:]}
    records = read_step_records(output / "metrics.jsonl")
    rates = [r["tokens_per_s"] for r in records[1:]]  # step 1 includes warm-up (allocations, JIT)
    return {"ranks": ranks, "status": "ok", "length": length, "peak_rss_per_rank_bytes": peaks,
            "tokens_per_s": statistics.median(rates), "step_s": statistics.median(r["seconds"] for r in records[1:]),
            "losses": [r["loss"] for r in records], "wall_s": time.monotonic() - started, "exit_code": code,
            "exit_log": log.strip().splitlines()[-1:] if code else []}


def _watch_ranks(process: subprocess.Popen) -> list[int]:
    """Peak RSS of each process running launch/train.py under `process` (the ranks), sampled every 0.2 s."""
    import psutil

    peaks: dict[int, int] = {}
    root = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for proc in tree:
            try:
                if any(part.endswith("launch/train.py") for part in proc.cmdline()[:3]):  # not the launchers
                    peaks[proc.pid] = max(peaks.get(proc.pid, 0), proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)
    return [peaks[pid] for pid in sorted(peaks)]


def sp_part(args) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="sp-bench-") as tmp:
        rows = [sp_run(ranks, args.sp_length, Path(tmp), 29650 + ranks) for ranks in (1, 2)]
    for row in rows:
        if row["status"] == "ok":
            peaks = ", ".join(f"{p / GB:.2f}" for p in row["peak_rss_per_rank_bytes"])
            print(f"SP={row['ranks']}  L={row['length']}: peak RSS per rank {peaks} GB, {row['tokens_per_s']:.0f} "
                  f"tokens/s, {row['step_s']:.1f} s/step, losses {[round(x, 4) for x in row['losses']]}")
        else:
            print(f"SP={row['ranks']}: {row['status']}: {row['log_tail']}")
    return rows


# --------------------------------------------------------------------------- tiled: SmolLM2, one step

def tiled_recipe(length: int, tiled: bool, model: str = "smollm2-135m"):
    from bench.train_step import model_overrides
    from harness.recipe import load_recipe

    return load_recipe(ROOT / SMOLLM2, [*model_overrides(model, length), f"data.max_seq_length={length}",
                                        f"train.tiled_mlp={'true' if tiled else 'false'}", "train.micro_batch_size=1",
                                        "train.grad_accum=1"])


def tiled_child(length: int, tiled: bool, model: str = "smollm2-135m") -> dict:
    """Child process: the session as training builds it (build_model tiles the MLPs when the recipe
    says so; engine.prepare), one forward + backward of the training loop's step."""
    import torch

    from bench.memory import forward_backward
    from harness.loop import Loop
    from harness.loop_memory import random_batch
    from harness.session import build_session

    loop = Loop(build_session(tiled_recipe(length, tiled, model), with_data=False, steps=1))
    batch = random_batch(loop.built.model.get_output_embeddings().out_features, 1, length,
                         torch.Generator().manual_seed(0), loop.engine.device)
    before = current_rss()
    if not reset_peak_rss():
        raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs is not writable)")
    started = time.perf_counter()
    loss = forward_backward(loop, batch)
    seconds = time.perf_counter() - started
    return {"status": "ok", "before_bytes": before, "peak_bytes": peak_rss(), "step_s": seconds,
            "tokens_per_s": length / seconds, "loss": loss}


def tiled_part(args) -> list[dict]:
    from harness.memory import plan

    rows = []
    for length in args.tiled_lengths:
        for tiled in (False, True):
            command = [sys.executable, __file__, "--child-tiled", str(length), "1" if tiled else "0",
                       "--model", args.model]
            row = {"length": length, "tiled_mlp": tiled,
                   **run_child(command, env=child_env(glibc_defaults=True), budget_bytes=args.budget_gb * GB,
                               timeout_s=args.timeout_min * 60)}
            row["planned_dynamic_bytes"] = plan(tiled_recipe(length, tiled, args.model), device="cpu").dynamic_bytes
            rows.append(row)
            print(f"L={length:>6} tiled={tiled!s:<5} {_tiled_summary(row)}", flush=True)
    for length in args.tiled_lengths:
        plain, tiled = (next(r for r in rows if r["length"] == length and r["tiled_mlp"] == t) for t in (False, True))
        if plain["status"] == tiled["status"] == "ok":
            saved = plain["peak_bytes"] - tiled["peak_bytes"]
            planned = plain["planned_dynamic_bytes"] - tiled["planned_dynamic_bytes"]
            print(f"L={length}: tiled MLP saves {saved / GB:.2f} GB of peak RSS (planner: {planned / GB:.2f} GB), "
                  f"tokens/s {plain['tokens_per_s']:.1f} -> {tiled['tokens_per_s']:.1f}")
    return rows


def _tiled_summary(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    return (f"peak {row['peak_bytes'] / GB:.2f} GB (step adds {(row['peak_bytes'] - row['before_bytes']) / GB:.2f}; "
            f"planner {row['planned_dynamic_bytes'] / GB:.2f}), {row['tokens_per_s']:.1f} tokens/s")


# --------------------------------------------------------------------------- plan: the table

def plan_part() -> list[dict]:
    """Every (model, card, count, variant): the peak per card at each length, and the longest that fits."""
    from harness.memory import CARDS, PlanError, longest_fitting, model_shape, plan
    from harness.recipe import load_recipe

    rows = []
    for model, recipe_file in PLAN_MODELS.items():
        for size, card in PLAN_CARDS.items():
            for count in PLAN_COUNTS:
                for variant, overrides in PLAN_VARIANTS.items():
                    base = [f"engine.sequence_parallel_size={count}", *overrides]
                    recipe = load_recipe(ROOT / recipe_file, base)
                    try:
                        longest = longest_fitting(recipe, model_shape(recipe), "cuda", CARDS[card], count)
                        plans = {length: plan(load_recipe(ROOT / recipe_file, [*base, f"data.max_seq_length={length}",
                                                                                 f"position.target_length={length}"]),
                                              card=card, cards=count) for length in PLAN_LENGTHS}
                    except PlanError as error:
                        rows.append({"model": model, "card": card, "cards": count, "variant": variant,
                                     "error": str(error)})
                        continue
                    rows.append({"model": model, "card": card, "card_gb": size, "cards": count, "variant": variant,
                                 "sequence_parallel_size": count, "longest_fitting": longest,
                                 "peak_bytes": {str(k): p.peak_bytes for k, p in plans.items()},
                                 "cpu_bytes": {str(k): p.cpu_bytes for k, p in plans.items()}})  # per rank
    _print_plan(rows)
    return rows


def _print_plan(rows: list[dict]) -> None:
    """Longest sequence that fits, per model and card: columns = cards x variants."""
    print(f"{'model':<11} {'card':<6} {'cards':>5}  " + "  ".join(f"{v:>14}" for v in PLAN_VARIANTS))
    for model in PLAN_MODELS:
        for size, card in PLAN_CARDS.items():
            for count in PLAN_COUNTS:
                cells = [next(r for r in rows if (r["model"], r["card"], r["cards"], r["variant"])
                              == (model, card, count, variant)) for variant in PLAN_VARIANTS]
                text = ["error" if "error" in c else _tokens(c["longest_fitting"]) for c in cells]
                print(f"{model:<11} {size:<6} {count:>5}  " + "  ".join(f"{t:>14}" for t in text))


def _tokens(count: int) -> str:
    return "none" if not count else f"{count // 1024:,}k"


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("sp", "tiled", "plan"), default=["sp", "tiled", "plan"])
    parser.add_argument("--sp-length", type=int, default=16384)
    parser.add_argument("--tiled-lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--model", choices=("smollm2-135m", *LLAMA2_SHAPES), default="smollm2-135m",
                        help="tiled: the recipe's SmolLM2-135M, or random weights of a LLaMA2 shape (llama-tiny: "
                             "a smoke run)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON files go")
    parser.add_argument("--budget-gb", type=float, default=24.0, help="kill a tiled child above this RSS")
    parser.add_argument("--timeout-min", type=float, default=90.0)
    parser.add_argument("--child-tiled", nargs=2, metavar=("LENGTH", "TILED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_tiled:
        emit(tiled_child(int(args.child_tiled[0]), args.child_tiled[1] == "1", args.model))
        return 0
    if "plan" in args.parts:
        table = plan_part()
        _write(args.results_dir / "sequence_parallel_plan.json", {"lengths": PLAN_LENGTHS, "rows": table})
    measured = {}
    if "sp" in args.parts:
        measured["sp"] = sp_part(args)
    if "tiled" in args.parts:
        measured["tiled"] = tiled_part(args)
    if measured:
        path = args.results_dir / "sequence_parallel.json"
        previous = json.loads(path.read_text()) if path.is_file() else {}
        if "tiled" in measured:  # lengths measured now replace theirs; the others stay
            kept = [row for row in previous.get("tiled", []) if row["length"] not in args.tiled_lengths]
            measured["tiled"] = sorted(kept + measured["tiled"], key=lambda row: (row["length"], row["tiled_mlp"]))
        _write(path, {**previous, "machine": machine(), **measured})
    return 0


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {shown(path)}")


if __name__ == "__main__":
    sys.exit(main())
