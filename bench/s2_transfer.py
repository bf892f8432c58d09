"""Why an S2-trained adapter does or does not hold under full attention: two measurements on the
testbed grid's finished runs (bench/testbed.py), at the extended length (4x the window).

1. Perplexity under a sliding window: every token reads only the W tokens before it (W = the S2
   group, 2x it, the whole sequence). An adapter that learnt attention that never reaches past
   its group reads as well with W = G as with full attention; one that breaks under full
   attention breaks because of what it reads past G.
2. Attention mass by distance, per layer and head, under full attention: the share of each
   query's attention probability on keys at distance [0, G/4), [G/4, G), [G, 2G), [2G, 4G).

    python bench/s2_transfer.py                       # the x4 grid's runs under runs/testbed
    python bench/s2_transfer.py --rows longqlora-pi,qlora-full-pi --eval-tokens 8192

Output: two tables, bench/results/s2_transfer.json and s2_transfer.png (mass beyond G by layer).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS_DIR, ROOT, machine, shown, warn_load  # noqa: E402
from harness import experiments as ex  # noqa: E402
from harness import testbed as tb  # noqa: E402

PROBE = "harness_probe"
ROWS = ("longqlora", "qlora-full", "longqlora-pi", "qlora-full-pi")


class Probe:
    """What the probe attention does on the next forward passes: the window, and the mass it records."""

    window: int = 0  # 0: full causal attention
    buckets: tuple[int, ...] = ()  # distance bucket edges, e.g. (0, 64, 256, 512, 1024)
    mass: dict[int, torch.Tensor] = {}  # layer -> (heads, buckets) summed probability
    queries: dict[int, int] = {}  # layer -> queries summed


def probe_attention(module, query, key, value, attention_mask, *, scaling=None, **kwargs):
    """Dense causal attention, optionally inside a sliding window, recording the attention mass by
    distance. query (B, H, L, D), key/value (B, H_kv, L, D) -> ((B, L, H, D), None)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    length = query.shape[2]
    distance = torch.arange(length)[:, None] - torch.arange(length)[None, :]  # (L, L): i - j
    allowed = (distance >= 0) & ((distance < Probe.window) if Probe.window else True)
    scores = (query @ key.transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # (B, H, L, L)
    if Probe.buckets:
        layer = module.layer_idx
        bucket = torch.bucketize(distance.clamp(min=0), torch.tensor(Probe.buckets[1:]), right=True)  # (L, L)
        summed = torch.zeros(probs.shape[1], len(Probe.buckets) - 1, dtype=torch.float64)
        for b in range(len(Probe.buckets) - 1):
            summed[:, b] = (probs * (allowed & (bucket == b))).sum((0, 2, 3)).double()
        Probe.mass[layer] = Probe.mass.get(layer, 0) + summed
        Probe.queries[layer] = Probe.queries.get(layer, 0) + probs.shape[0] * length
    return (probs @ value).transpose(1, 2).contiguous(), None


def install_probe(model) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(PROBE, probe_attention)
    AttentionMaskInterface.register(PROBE, flash_attention_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(PROBE)


@torch.no_grad()
def windowed_ppl(model, sequences: torch.Tensor, window: int) -> float:
    """Perplexity over non-overlapping sequences (N, L), every token reading at most `window` keys."""
    Probe.window, Probe.buckets = window, ()
    total, count = 0.0, 0
    for row in sequences:
        logits = model(input_ids=row[None]).logits[0, :-1].double()
        total += float(F.cross_entropy(logits, row[1:], reduction="sum"))
        count += row.numel() - 1
    return math.exp(total / count)


@torch.no_grad()
def attention_mass(model, sequences: torch.Tensor, buckets: tuple[int, ...]) -> list[list[list[float]]]:
    """[layer][head][bucket]: the mean share of a query's attention at those distances (full attention)."""
    Probe.window, Probe.buckets, Probe.mass, Probe.queries = 0, buckets, {}, {}
    for row in sequences:
        model(input_ids=row[None])
    return [(Probe.mass[layer] / Probe.queries[layer]).tolist() for layer in sorted(Probe.mass)]


def held_out_sequences(tokenizer, path: Path, length: int, tokens: int) -> torch.Tensor:
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:tokens]
    count = len(ids) // length
    return torch.tensor(ids[:count * length]).view(count, length)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "testbed", help="bench/testbed.py's --output")
    parser.add_argument("--rows", default=",".join(ROWS), help="trained grid rows whose final/ adapters to read")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--steps", type=int, default=400, help="the grid's --steps (names the run directories)")
    parser.add_argument("--eval-tokens", type=int, default=16_384, help="held-out tokens (bytes) read")
    parser.add_argument("--results", default="s2_transfer")
    args = parser.parse_args(argv)

    from harness.evaluation import ModelSpec, load_model

    load = warn_load("at the start")
    corpus = tb.books_corpus(args.runs / "data")
    testbed = tb.build_testbed(corpus)
    native = tb.native_window(testbed)
    top, group = args.factor * native, args.factor * native // 4
    buckets = (0, group // 4, group, 2 * group, top)
    windows = (group, 2 * group, top)
    rows = []
    for name in args.rows.split(","):
        run_dir = args.runs / testbed.name / ex.run_dir_name(name, args.factor, args.steps)
        adapter = ex.finished_run(run_dir)
        if adapter is None:
            sys.exit(f"error: {run_dir / 'final'} does not exist: run bench/testbed.py --rows {name} --factor "
                     f"{args.factor} --steps {args.steps} first")
        started = time.perf_counter()
        model, tokenizer, _ = load_model(ModelSpec(str(testbed), adapter=str(adapter)))
        install_probe(model)
        sequences = held_out_sequences(tokenizer, corpus.held_out, top, args.eval_tokens)
        ppl = {w: windowed_ppl(model, sequences, w) for w in windows}
        mass = attention_mass(model, sequences, buckets)
        rows.append({"name": name, "label": ex.row_named(name).label, "ppl_by_window": ppl, "mass": mass,
                     "seconds": time.perf_counter() - started})
        print(f"{name}: {', '.join(f'window {w}: {v:.2f}' for w, v in ppl.items())}")
    print_tables(rows, windows, buckets)
    result = {"machine": machine(), "config": {**vars(args), "runs": str(args.runs), "testbed": str(testbed),
                                               "buckets": buckets, "windows": windows, "load_start": load},
              "rows": rows}
    path = RESULTS_DIR / f"{args.results}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot_mass(rows, buckets, RESULTS_DIR / f"{args.results}.png")
    print(f"wrote {shown(path)}, {args.results}.png")


def print_tables(rows: list[dict], windows, buckets) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    table = Table(title=f"Held-out perplexity at {windows[-1]} under a sliding window (The Complete Angler)")
    table.add_column("row")
    for w in windows:
        table.add_column(f"window {w}" + (" (full)" if w == windows[-1] else ""), justify="right")
    for row in rows:
        table.add_row(row["label"], *(f"{row['ppl_by_window'][w]:.2f}" for w in windows))
    console.print(table)
    spans = [f"[{a}, {b})" for a, b in zip(buckets, buckets[1:])]
    table = Table(title="Attention mass by distance under full attention, mean over layers and heads (max head)")
    table.add_column("row")
    for span in spans:
        table.add_column(span, justify="right")
    for row in rows:
        heads = torch.tensor(row["mass"])  # (layers, heads, buckets)
        mean, top = heads.mean((0, 1)), heads.flatten(0, 1).max(0).values
        table.add_row(row["label"], *(f"{m:.3f} ({t:.3f})" for m, t in zip(mean.tolist(), top.tolist())))
    console.print(table)


def plot_mass(rows: list[dict], buckets, path: Path) -> None:
    """Per layer, the mean (over heads) share of attention beyond the S2 group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        beyond = torch.tensor(row["mass"])[:, :, 2:].sum(-1).mean(-1)  # (layers,)
        axes.plot(range(1, len(beyond) + 1), beyond.tolist(), marker="o", label=row["label"])
    axes.set_xlabel("layer")
    axes.set_ylabel(f"attention mass at distance >= {buckets[2]} (mean over heads)")
    axes.set_title("How far each layer reads under full attention")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
