"""The paper's comparison grid on the short-window testbed: every way of extending it 4x.

    python bench/testbed.py                                 # the grid (~1 h on 2 cores, testbed built once)
    python bench/testbed.py --steps 8 --eval-tokens 6000 --rows base,pi,longqlora   # a smoke run

The testbed (harness.testbed, recipes/testbed_pretrain.toml) is a 256-token byte-level LLaMA
pretrained by the harness on three of the books shipped in recipes/data/books; the fourth, *The Complete
Angler*, is held out: no row trains on it, every row is scored on its first --eval-tokens
bytes with both protocols (strided and LongLoRA's) at 1/4, 1/2, 1, 2 and 4x the window.
The rows are harness.experiments.GRID: the base, zero-shot PI / dynamic NTK / YaRN x4, and runs of
recipes/testbed_longqlora.toml and its variants on the same books with the same steps and
tokens per step: LongQLoRA as the recipe has it (YaRN + S2) and as the paper has it (PI + S2),
QLoRA + full attention with each position method, dynamic NTK + S2, LoRA on a 32-bit base +
full attention and full fine-tuning (PI), plus the ablations of the paper's setting (S2 at
inference, rank 8, 1/4 and 1/2 of the steps, the last two read from checkpoints of its run:
the scheduler is constant). Every trained row is read with full attention unless it says S2.

Each training runs in its own process (peak RSS is its own); a run resumes where it stopped
(full fine-tuning starts over: the harness cannot resume it yet), and a finished evaluation is
reused while its model and settings are unchanged. Output: tables, bench/results/testbed.json
(machine, settings, one row per model x protocol x length, training stats, the testbed's
pretraining record, the targets), testbed.png (perplexity against length) and
testbed_loss.png (the loss curves).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS_DIR, ROOT, load_average, machine, shown, warn_load  # noqa: E402
from harness import experiments as ex  # noqa: E402
from harness import testbed as tb  # noqa: E402
from harness.metrics import read_step_records  # noqa: E402

PROTOCOLS = ("strided", "longlora")
EVAL_BATCH = 8  # windows per forward pass: a 4.7M model's matrices are too small to keep 2 cores busy one by one


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps of every trained row")
    parser.add_argument("--eval-tokens", type=int, default=40_000, help="held-out tokens (bytes) scored")
    parser.add_argument("--factor", type=int, default=4, help="the extension: target = factor x the native window")
    parser.add_argument("--shares", default="0.25,0.5,1,2,4", help="evaluation lengths, in native windows")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="strided, longlora or both")
    parser.add_argument("--rows", help="comma-separated row names (default: the whole grid)")
    parser.add_argument("--pretrain", action="append", default=[],
                        help="override of recipes/testbed_pretrain.toml (repeatable), e.g. train.max_steps=300")
    parser.add_argument("--train", action="append", default=[],
                        help="override of every trained row's recipe (repeatable), e.g. train.micro_batch_size=2")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "testbed")
    parser.add_argument("--results", default="testbed", help="name of the JSON and PNG files under bench/results")
    args = parser.parse_args(argv)
    args.grid = [ex.row_named(n) for n in args.rows.split(",")] if args.rows else list(ex.GRID)
    args.shares = [float(share) for share in args.shares.split(",")]
    args.protocols = args.protocols.split(",")
    return args


def lengths_of(args, native: int) -> list[int]:
    return [int(share * native) for share in args.shares]


# --------------------------------------------------------------------------- training

def train_row(row: ex.Row, testbed: Path, data: tb.Corpus, run_dir: Path, args) -> dict:
    """Train (or resume, or reuse) one row's run in a child process; its stats from metrics.jsonl."""
    stats_file = run_dir / "train_stats.json"
    reused = ex.finished_run(run_dir) is not None
    if reused and stats_file.is_file():
        return json.loads(stats_file.read_text())
    before = warn_load(f"before training {row.name}")
    started = time.perf_counter()
    ex.train_or_reuse(row, testbed, data, run_dir, steps=args.steps,
                      save_every=ex.save_every(args.grid, row.name, args.steps),
                      target_length=args.factor * tb.native_window(testbed), train_overrides=args.train,
                      own_process=True)
    stats = run_stats(run_dir / "metrics.jsonl")
    wall_s = None if reused else time.perf_counter() - started  # a reused run's training time is unknown here
    stats.update(wall_s=wall_s, load_before=before, load_after=warn_load(f"after {row.name}"))
    stats_file.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def run_stats(metrics: Path) -> dict:
    """Median tokens/s over the steps after the first (robust to other jobs' bursts), peak RSS,
    the loss curve."""
    steps = read_step_records(metrics)
    return {"tokens_per_s": tb.median([s["tokens_per_s"] for s in steps[1:]] or [steps[0]["tokens_per_s"]]),
            "peak_memory_gib": max(s["peak_memory_gib"] for s in steps), "steps": steps[-1]["step"],
            "tokens_seen": sum(s.get("tokens", 0) for s in steps), "loss": [(s["step"], s["loss"]) for s in steps]}


# --------------------------------------------------------------------------- evaluation

def evaluate_row(row: ex.Row, spec: dict, data: tb.Corpus, protocol: str, lengths: list[int], args) -> list[dict]:
    """One row's records for one protocol; reused from an earlier run with the same model and settings."""
    from harness.evaluation import ModelSpec, PplSettings, compare_models

    settings = {"spec": spec, "protocol": protocol, "lengths": lengths, "max_tokens": args.eval_tokens,
                "data": str(data.held_out), "batch_size": EVAL_BATCH}
    cache = args.output / "evals" / f"{row.name}.{protocol}.json"
    if cache.is_file() and json.loads(cache.read_text())["settings"] == settings:
        return json.loads(cache.read_text())["records"]
    records = compare_models([ModelSpec(**spec, label=row.label)], str(data.held_out),
                             PplSettings(lengths, protocol=protocol, max_tokens=args.eval_tokens,
                                         batch_size=EVAL_BATCH))
    rows = [{"name": row.name, "label": row.label, "protocol": r.protocol, "length": r.seq_len, "ppl": r.ppl,
             "tokens": r.tokens} for r in records]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"settings": settings, "records": rows}, indent=2) + "\n")
    return rows


# --------------------------------------------------------------------------- the grid

def run_grid(args) -> tuple[Path, list[dict], dict]:
    """(testbed, perplexity rows, training stats by run name)."""
    data = tb.books_corpus(args.output / "data")
    testbed = tb.build_testbed(data, args.pretrain)
    lengths = lengths_of(args, tb.native_window(testbed))
    root = args.output / testbed.name
    training, records = {}, []
    for row in args.grid:
        run_dir = root / run_name(row, args)
        if row.run_name not in training and ex.row_named(row.run_name).train is not None:
            training[row.run_name] = train_row(ex.row_named(row.run_name), testbed, data, run_dir, args)
        spec = ex.evaluated_model(row, testbed, run_dir, args.steps, args.factor)
        for protocol in args.protocols:
            records += evaluate_row(row, spec, data, protocol, lengths, args)
    return testbed, records, training


def run_name(row: ex.Row, args) -> str:
    """harness.experiments.run_dir_name of the row's run with this grid's settings."""
    return ex.run_dir_name(row.run_name, args.factor, args.steps, args.train)


def ppl(records: list[dict], name: str, length: int, protocol: str = "strided") -> float | None:
    for r in records:
        if (r["name"], r["length"], r["protocol"]) == (name, length, protocol):
            return r["ppl"]
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None else None


def check(value: float | None, ok) -> dict:
    """A target's record: its value and whether it is met (None: a row it needs was not run)."""
    return {"value": value, "met": None if value is None else ok(value)}


POSE_ROWS = ("pose", "pose-quarter")  # PoSE + YaRN at a 256-token window, at 1/4 of the target


def targets(records: list[dict], training: dict, native: int, factor: int = 4) -> dict:
    """The issues' targets, each with its numbers and whether it is met (None: a row is missing)."""
    top = factor * native
    base = ppl(records, "base", native)

    def transfer(name: str, reference: str) -> dict:
        """A row read with full attention at the top length: against the base at its own window (within 5%)
        and against `reference`, the same extension trained otherwise, at the top length (within 3%)."""
        return {f"{name}_top_vs_base_1x": check(ratio(ppl(records, name, top), base), lambda v: v <= 1.05),
                f"{name}_top_vs_{reference.replace('-', '_')}": check(
                    ratio(ppl(records, name, top), ppl(records, reference, top)), lambda v: abs(v - 1) <= 0.03)}

    def wall(name: str) -> float | None:
        return training.get(name, {}).get("wall_s")

    speed = ratio(*(training.get(n, {}).get("tokens_per_s") for n in ("longqlora", "qlora-full")))
    found = {
        **transfer("longqlora", "qlora-full"),
        **transfer("longqlora-pi", "qlora-full-pi"),
        "longqlora_speed_vs_qlora_full": check(speed, lambda v: v >= 1.5),
        "s2_at_inference_vs_full_top": check(ratio(ppl(records, "longqlora-s2-eval", top),
                                                  ppl(records, "longqlora-pi", top)), lambda v: v > 1),
        "rank64_vs_rank8_top": check(ratio(ppl(records, "longqlora-pi", top), ppl(records, "longqlora-r8", top)),
                                    lambda v: v <= 1),
    }
    for name in POSE_ROWS:  # issue 31: train short (PoSE), read long, in at most 1/3 of LongQLoRA's time
        found.update(transfer(name, "longqlora"))
        found[f"{name}_wall_vs_longqlora"] = check(ratio(wall(name), wall("longqlora")), lambda v: v <= 1 / 3)
    for name in training:  # the short context kept: every trained row within 1% of the base at its window
        found[f"{name}_1x_vs_base_1x"] = check(ratio(ppl(records, name, native), base), lambda v: v <= 1.01)
    return found


# --------------------------------------------------------------------------- output

def print_tables(records: list[dict], training: dict, grid: list[ex.Row], lengths: list[int], protocols) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    for protocol in protocols:
        table = Table(title=f"Held-out perplexity ({protocol}), The Complete Angler")
        for column in ["row", *map(str, lengths), "tok/s", "peak GiB"]:
            table.add_column(column, justify="left" if column == "row" else "right")
        for row in grid:
            stats = training.get(row.run_name, {})
            values = [ppl(records, row.name, n, protocol) for n in lengths]
            table.add_row(row.label, *(f"{v:.2f}" if v is not None else "-" for v in values),
                          f"{stats['tokens_per_s']:.0f}" if stats else "",
                          f"{stats['peak_memory_gib']:.2f}" if stats else "")
        console.print(table)


def print_targets(found: dict) -> None:
    for name, target in found.items():
        value = "-" if target["value"] is None else f"{target['value']:.3f}"
        verdict = {True: "met", False: "MISSED", None: "not run"}[target["met"]]
        print(f"target {name}: {value} ({verdict})")


def plot_ppl(records: list[dict], grid: list[ex.Row], lengths: list[int], native: int, protocols, path: Path) -> None:
    plt = _pyplot()
    figure, panels = plt.subplots(1, len(protocols), figsize=(6.5 * len(protocols), 5), sharey=True, squeeze=False)
    panels = panels[0]
    for axes, protocol in zip(panels, protocols):
        for index, row in enumerate(grid):
            points = [(n, ppl(records, row.name, n, protocol)) for n in lengths]
            points = [(n, v) for n, v in points if v is not None]
            axes.plot(*zip(*points), marker="os^vD<>px*hH"[index % 12], label=row.label,
                      linestyle="--" if row.train is None and not row.run else "-")
        axes.axvline(native, color="grey", linewidth=0.8)
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xticks(lengths, [str(n) for n in lengths])
        axes.set_xlabel("context length (tokens = bytes)")
        axes.set_title(f"{protocol} protocol")
        axes.grid(True, which="both", alpha=0.3)
    panels[0].set_ylabel("perplexity (held-out book)")
    panels[-1].legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_losses(record: dict, training: dict, path: Path) -> None:
    """The testbed's pretraining curves and every trained row's training loss (a 10-step mean)."""
    plt = _pyplot()
    figure, (pre, ext) = plt.subplots(1, 2, figsize=(12, 4.5))
    pre.plot(*zip(*smooth(record["train_loss"])), label="training (10-step mean)")
    pre.plot(*zip(*record["validation_loss"]), marker="o", label="validation (tails of the books)")
    pre.set_title(f"testbed pretraining at 256 ({record['steps']} steps, {record['tokens']:,} tokens)")
    for name, stats in training.items():
        ext.plot(*zip(*smooth(stats["loss"])), label=name)
    ext.set_title("extension: training loss (10-step mean)")
    for axes in (pre, ext):
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("loss (nats per byte)")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def smooth(curve: list, width: int = 10) -> list[tuple[int, float]]:
    return [(curve[i][0],
             sum(v for _, v in curve[max(0, i - width + 1):i + 1]) / len(curve[max(0, i - width + 1):i + 1]))
            for i in range(len(curve))]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def main(argv=None) -> None:
    args = parse_args(argv)
    started, load_start = time.perf_counter(), warn_load("at the start")
    testbed, records, training = run_grid(args)
    native = tb.native_window(testbed)
    lengths = lengths_of(args, native)
    record = tb.read_record(testbed)
    found = targets(records, training, native, args.factor)
    print_tables(records, training, args.grid, lengths, args.protocols)
    print(f"testbed {testbed}: {record['steps']} steps, {record['tokens']:,} tokens, plateau {record['plateau']}")
    print_targets(found)
    config = {"steps": args.steps, "eval_tokens": args.eval_tokens, "factor": args.factor,
              "train_overrides": args.train, "rows": [r.name for r in args.grid],
              "pretrain_overrides": args.pretrain, "lengths": lengths, "testbed": str(testbed),
              "wall_s": time.perf_counter() - started, "load_start": load_start, "load_end": load_average()}
    result = {"machine": machine(), "config": config, "rows": records, "training": training,
              "testbed": record, "targets": found}
    path = RESULTS_DIR / f"{args.results}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot_ppl(records, args.grid, lengths, native, args.protocols, RESULTS_DIR / f"{args.results}.png")
    plot_losses(record, training, RESULTS_DIR / f"{args.results}_loss.png")
    print(f"wrote {shown(path)}, {args.results}.png, {args.results}_loss.png")


if __name__ == "__main__":
    main()
