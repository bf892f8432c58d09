"""The short-window testbed: a small LLaMA pretrained by the harness itself. The grid of ways to
extend it 4x is harness.experiments (bench/testbed.py runs it; harness.demo shows three of its rows).

    corpus = split_corpus(train_files, held_out, folder)   # training text, its tails, held-out text
    testbed = build_testbed(corpus)                        # $HARNESS_CACHE/testbed/<key>/, built once
    variant = zero_shot_dir(testbed, "yarn", 1024)         # the testbed with YaRN x4 in its config

The testbed is recipes/testbed_pretrain.toml: a 6-layer, d=256 byte-level LLaMA (4.7M
parameters) trained from random weights with full fine-tuning and full attention at a native
window of 256 tokens, on the training text minus a tail of each document; the tails are the
validation split on which the plateau is read (train.eval_every). The byte tokenizer needs no
training and no download, scores every model on the same bytes, and makes 256 tokens cheap
enough for a 2-core CPU to pretrain to a plateau and then extend 4x in minutes.

The cache entry is keyed by the resolved pretraining recipe and the bytes of the text, and
written through harness.base_model's atomic build (a temporary directory renamed into place,
a lock for concurrent builders): an interrupted build leaves nothing, the next one starts
again. It is a plain Hugging Face directory (config.json, model.safetensors, tokenizer files)
plus testbed.json (the pretraining record: loss curves, steps, tokens, the plateau) and the
run's metrics.jsonl and recipe.toml.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from harness.errors import HarnessError

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_RECIPE = ROOT / "recipes" / "testbed_pretrain.toml"
BOOKS = ROOT / "recipes" / "data" / "books"  # public domain, shipped: the demo and the grid run offline
TRAIN_BOOKS = ("jack_sheppard.txt", "news_from_nowhere.txt", "the_devils_dictionary.txt")
HELD_OUT_BOOK = "the_complete_angler.txt"  # nothing trains on it; every row is scored on it
VALIDATION_CHARS = 16_000  # the tail of each training document held out for the plateau
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")
RECORD_FILE = "testbed.json"
PLATEAU_SHARE = 0.2  # the plateau is read over the last fifth of the pretraining steps


class TestbedError(HarnessError, RuntimeError):
    __test__ = False  # not a pytest class


# --------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Corpus:
    train: Path  # a folder of training documents (split_corpus: their tails cut off)
    validation: Path | None  # the tails, one file, where the plateau is read; None: no validation
    held_out: Path  # the text every row is evaluated on; no row trains on it


def split_corpus(train_files: Sequence[Path], held_out: Path, folder: Path,
                 tail_chars: int = VALIDATION_CHARS) -> Corpus:
    """Write folder/train/<name>.txt (each document but its last `tail_chars` characters) and
    folder/validation.txt (the tails); rewritten only when they change."""
    if not train_files:
        raise TestbedError("the testbed needs at least one training document")
    texts = {Path(f).stem: Path(f).read_text(encoding="utf-8") for f in train_files}
    short = [name for name, text in texts.items() if len(text) < 4 * tail_chars]
    if short:
        raise TestbedError(f"training documents shorter than {4 * tail_chars:,} characters: {', '.join(short)}")
    train_dir = folder / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        _write_if_changed(train_dir / f"{name}.txt", text[:-tail_chars])
    validation = folder / "validation.txt"
    _write_if_changed(validation, "\n\n".join(text[-tail_chars:] for text in texts.values()))
    return Corpus(train_dir, validation, Path(held_out))


def books_corpus(folder: Path) -> Corpus:
    """The shipped books, split: three train (their tails validate), The Complete Angler is held out."""
    return split_corpus([BOOKS / name for name in TRAIN_BOOKS], BOOKS / HELD_OUT_BOOK, folder)


def _write_if_changed(path: Path, text: str) -> None:
    """Unchanged files keep their mtime, so the data cache and the testbed key stay valid."""
    from harness import atomic

    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic.write_text(path, text)


# --------------------------------------------------------------------------- the testbed

def validation_overrides(corpus: Corpus) -> list[str]:
    """The corpus's validation text as the held-out data; none at all without one (the grid's runs
    then train on every sample, as they always have)."""
    if corpus.validation:
        return [f'data.eval_path="{corpus.validation}"']
    return ["train.eval_every=0", "train.eval_holdout=0"]


def pretrain_overrides(corpus: Corpus, output_dir: Path, overrides: Sequence[str] = ()) -> list[str]:
    return [f'data.path="{corpus.train}"', *validation_overrides(corpus), f'train.output_dir="{output_dir}"',
            "train.save_every=0", *overrides]


def testbed_key(corpus: Corpus, overrides: Sequence[str] = ()) -> str:
    """16 hex digits of the pretraining recipe's text, the overrides and the text's bytes. The
    recipe file, not its resolved form: a key the harness adds later (with its default) does
    not throw away a testbed that took a quarter of an hour."""
    digest = hashlib.sha256(PRETRAIN_RECIPE.read_bytes() + json.dumps(list(overrides)).encode())
    files = sorted(p for p in corpus.train.rglob("*") if p.is_file())
    named = [(str(p.relative_to(corpus.train)), p) for p in files] + ([("validation", corpus.validation)]
                                                                     if corpus.validation else [])
    for name, path in named:
        digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def testbed_dir(corpus: Corpus, overrides: Sequence[str] = ()) -> Path:
    from harness.base_model import cache_root

    return cache_root() / "testbed" / testbed_key(corpus, overrides)


def build_testbed(corpus: Corpus, overrides: Sequence[str] = ()) -> Path:
    """The pretrained testbed for this corpus and these recipe overrides (e.g. train.max_steps=300):
    reused when cached, else pretrained through harness.train.train and cached atomically."""
    from harness.base_model import _atomic_build

    return _atomic_build(testbed_dir(corpus, overrides), lambda tmp: _pretrain_into(tmp, corpus, overrides))


def _pretrain_into(tmp: Path, corpus: Corpus, overrides: Sequence[str]) -> None:
    """Pretrain in tmp/run, keep the model (keep_model), drop the run and its checkpoints."""
    import time

    from harness.recipe import load_recipe
    from harness.train import train

    recipe = load_recipe(PRETRAIN_RECIPE, pretrain_overrides(corpus, tmp / "run", overrides))
    started = time.perf_counter()
    run = train(recipe)
    if not (run / "final").is_dir():  # stopped by a signal: full fine-tuning cannot resume, so nothing is kept
        raise TestbedError("pretraining the testbed stopped before its last step; run the command again to restart it")
    keep_model(run, tmp, seconds=time.perf_counter() - started)
    shutil.rmtree(run)


def keep_model(run: Path, directory: Path, *, seconds: float) -> None:
    """What a user of the testbed needs, from a finished pretraining run into `directory`.

    A full fine-tuning run's final/ is already a loadable Hugging Face model (config.json,
    model.safetensors, from save_pretrained) beside the harness's recipe.toml; the tokenizer,
    which training does not write, is saved from the recipe's own (model.tokenizer)."""
    from harness import rundir
    from harness.tokenizer import load_tokenizer

    final = run / "final"
    recipe = rundir.read_recipe(final)
    for name in MODEL_FILES:
        shutil.copyfile(final / name, directory / name)
    load_tokenizer(recipe.model.tokenizer).save_pretrained(directory)
    shutil.copyfile(final / "recipe.toml", directory / "recipe.toml")
    shutil.copyfile(run / "metrics.jsonl", directory / "metrics.jsonl")
    record = pretraining_record(run / "metrics.jsonl", recipe.resolved.tokens_per_step)
    record["seconds"] = seconds
    (directory / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def pretraining_record(metrics: Path, tokens_per_step: int) -> dict:
    """Steps, tokens, the training and validation loss curves and the plateau, from metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    validation = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    steps = train[-1][0] if train else 0
    return {"steps": steps, "tokens": steps * tokens_per_step, "train_loss": train, "validation_loss": validation,
            "tokens_per_s": median(speeds) if speeds else 0.0, "plateau": plateau(validation)}


def plateau(curve: Sequence[tuple[int, float]], share: float = PLATEAU_SHARE) -> dict:
    """How much the validation perplexity still fell over the last `share` of the steps: the
    relative gain from the point nearest (1 - share) x the last step to the end."""
    if len(curve) < 2:
        return {"from_step": None, "to_step": None, "ppl_gain": None}
    last_step, last_loss = curve[-1]
    start = min(curve[:-1], key=lambda point: abs(point[0] - (1 - share) * last_step))
    return {"from_step": start[0], "to_step": last_step, "ppl_from": math.exp(start[1]), "ppl_to": math.exp(last_loss),
            "ppl_gain": 1 - math.exp(last_loss - start[1])}


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def read_record(testbed: Path) -> dict:
    return json.loads((testbed / RECORD_FILE).read_text(encoding="utf-8"))


def native_window(testbed: Path) -> int:
    return int(json.loads((testbed / "config.json").read_text(encoding="utf-8"))["max_position_embeddings"])


# --------------------------------------------------------------------------- zero-shot variants

def zero_shot_dir(testbed: Path, position: str, target_length: int) -> Path:
    """The testbed with a position backend's rope in its config.json and nothing trained: the
    other files are links to the testbed's. tools/eval_ppl.py's --rope-factor gives linear PI
    only; dynamic NTK and YaRN are evaluated through such a directory."""
    from harness.base_model import _atomic_build

    def build(tmp: Path) -> None:
        from transformers import AutoConfig

        from harness import registry

        config = AutoConfig.from_pretrained(testbed)
        registry.get("position", position).fn(config, target_length=target_length)
        config.save_pretrained(tmp)
        for file in testbed.iterdir():
            if file.is_file() and file.name != "config.json":
                (tmp / file.name).symlink_to(file.resolve())

    return _atomic_build(testbed.parent / f"{testbed.name}-{position}-{target_length}", build)
