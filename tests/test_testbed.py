"""The short-window testbed (harness.testbed) and its grid (bench/testbed.py): the bookkeeping
fast, on tiny models and made-up records; the shortened grid itself behind --runslow."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from harness import experiments as ex
from harness import testbed as tb
from harness.base_model import cache_root
from harness.recipe import load_recipe
from tests.conftest import tiny_llama_config

pytestmark = pytest.mark.usefixtures("session_cache")


@pytest.fixture
def saved_testbed(tmp_path):
    """A tiny random LLaMA saved as a testbed directory: 256-token window, byte tokenizer."""
    from transformers import LlamaForCausalLM

    from harness.tokenizer import byte_tokenizer

    directory = tmp_path / "testbed"
    LlamaForCausalLM(tiny_llama_config(max_position_embeddings=256)).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def corpus_of(tmp_path, sizes=(70_000, 80_000)) -> tb.Corpus:
    files = []
    for index, size in enumerate(sizes):
        files.append(tmp_path / f"doc{index}.txt")
        files[-1].write_text("".join(chr(97 + (i * 7 + index) % 26) for i in range(size)))
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("held out " * 1000)
    return tb.split_corpus(files, held_out, tmp_path / "corpus")


# --------------------------------------------------------------------------- data and cache key

def test_corpus_holds_out_each_documents_tail(tmp_path):
    corpus = corpus_of(tmp_path)
    assert sorted(p.name for p in corpus.train.iterdir()) == ["doc0.txt", "doc1.txt"]
    assert len((corpus.train / "doc0.txt").read_text()) == 70_000 - tb.VALIDATION_CHARS
    original = (tmp_path / "doc1.txt").read_text()
    assert corpus.validation.read_text().endswith(original[-tb.VALIDATION_CHARS:])
    mtime = (corpus.train / "doc0.txt").stat().st_mtime_ns
    time.sleep(0.01)
    tb.split_corpus([tmp_path / "doc0.txt", tmp_path / "doc1.txt"], corpus.held_out, tmp_path / "corpus")
    assert (corpus.train / "doc0.txt").stat().st_mtime_ns == mtime  # unchanged files are not rewritten


def test_corpus_refuses_documents_too_short_for_a_tail(tmp_path):
    with pytest.raises(tb.TestbedError, match="shorter than 64,000 characters: doc1"):
        corpus_of(tmp_path, sizes=(70_000, 1_000))


def test_testbed_key_follows_recipe_overrides_and_text(tmp_path):
    corpus = corpus_of(tmp_path)
    key = tb.testbed_key(corpus)
    assert tb.testbed_key(corpus) == key and len(key) == 16
    assert tb.testbed_key(corpus, ["train.max_steps=10"]) != key
    (corpus.train / "doc0.txt").write_text((corpus.train / "doc0.txt").read_text() + "x")
    assert tb.testbed_key(corpus) != key
    assert tb.testbed_dir(corpus).parent == cache_root() / "testbed"


# --------------------------------------------------------------------------- pretraining record

def test_pretraining_record_and_plateau(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 3.0 - s / 100, "tokens_per_s": 1000.0 + s, "peak_memory_gib": 1.0, "lr": 0.1}
             for s in range(1, 101)]
    lines += [{"step": 80, "eval_loss": 2.0}, {"step": 100, "eval_loss": 1.9}]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in sorted(lines, key=lambda r: r["step"])))
    record = tb.pretraining_record(metrics, tokens_per_step=4096)
    assert record["steps"] == 100 and record["tokens"] == 409_600
    assert record["tokens_per_s"] == 1051.0  # median of steps 2..100
    assert record["plateau"]["from_step"] == 80 and record["plateau"]["to_step"] == 100
    assert record["plateau"]["ppl_gain"] == pytest.approx(1 - math.exp(-0.1))


def test_plateau_of_a_short_curve_is_unknown():
    assert tb.plateau([(50, 2.0)])["ppl_gain"] is None


# --------------------------------------------------------------------------- the grid as data

def test_grid_rows_are_consistent():
    names = [row.name for row in ex.GRID]
    assert len(set(names)) == len(names)
    for row in ex.GRID:
        if row.run:
            source = ex.row_named(row.run)
            assert source.train is not None and row.train is None, row.name
            assert not (row.fraction < 1 and source.full_finetuning)  # full fine-tuning keeps no checkpoints
        assert 0 < row.fraction <= 1 and row.attention in ("full", "s2")
    assert [row.name for row in ex.trained_rows(ex.GRID)] == ["longqlora", "qlora-full", "longqlora-pi",
                                                              "qlora-full-pi", "longqlora-ntk", "lora-full", "full-ft",
                                                              "longqlora-r8", "longqlora-groups-half", "pose",
                                                              "pose-quarter", "pose-pi", "short",
                                                              "short-quarter"]
    assert [row.name for row in ex.trained_rows([ex.row_named("longqlora-half")])] == ["longqlora-pi"]


def test_checkpoints_the_fraction_rows_read():
    assert ex.checkpoint_steps(ex.GRID, "longqlora-pi", 200) == [50, 100]
    assert ex.save_every(ex.GRID, "longqlora-pi", 200) == 50
    assert ex.save_every(ex.GRID, "lora-full", 200) == 0
    assert ex.save_every([ex.row_named("longqlora")], "longqlora", 200) == 0


def test_every_trained_row_resolves_with_equal_steps_and_tokens(saved_testbed, tmp_path):
    corpus = corpus_of(tmp_path)
    resolved = {}
    for row in ex.trained_rows(ex.GRID):
        overrides = ex.extension_overrides(saved_testbed, corpus, tmp_path / row.name, steps=40, row=row,
                                           save_every=10)
        recipe = load_recipe(ex.EXTEND_RECIPE, overrides)
        resolved[row.name] = recipe
        window = 256 if row.window else 1024  # short-window rows: 256 tokens, or 1/4 of the 1024 target
        assert recipe.resolved.rope_factor == 4 and recipe.resolved.seq_len == window
        pose = recipe.layout.name == "pose"
        assert recipe.resolved.sample_length == (1024 if pose or not row.window else 256)
        groups = 512 if row.name == "longqlora-groups-half" else 256
        assert recipe.resolved.group_size == (groups if recipe.attention.name == "s2" else 0)
    # the same steps and samples per step; PoSE's samples are window-long (tokens_per_step), as in the paper
    assert len({(r.train.max_steps, r.resolved.effective_batch_size, r.data.path) for r in resolved.values()}) == 1
    assert len({r.resolved.tokens_per_step for name, r in resolved.items() if not ex.row_named(name).window}) == 1
    assert resolved["longqlora"].quantization.name == "nf4" and resolved["longqlora"].adapter.r == 64
    assert resolved["longqlora"].position.name == "yarn" and resolved["longqlora-pi"].position.name == "linear"
    yarn_rows = {"longqlora", "qlora-full", "pose", "pose-quarter", "short", "short-quarter"}
    assert {name for name, r in resolved.items() if r.position.name == "yarn"} == yarn_rows
    assert {name for name, r in resolved.items() if r.layout.name == "pose"} == {"pose", "pose-quarter", "pose-pi"}
    assert resolved["lora-full"].quantization.name == "none" and resolved["lora-full"].attention.name == "full"
    assert resolved["longqlora-r8"].adapter.r == 8
    full = resolved["full-ft"]
    assert (full.adapter.name, full.train.resume, full.train.overwrite, full.train.save_every) == ("none", "never",
                                                                                                   True, 0)
    assert resolved["longqlora"].train.resume == "auto" and resolved["longqlora"].train.save_every == 10


def test_two_x_overrides(saved_testbed, tmp_path):
    overrides = ex.extension_overrides(saved_testbed, corpus_of(tmp_path), tmp_path / "run", steps=5,
                                       row=ex.row_named("longqlora"), target_length=512)
    recipe = load_recipe(ex.EXTEND_RECIPE, overrides)
    assert (recipe.resolved.rope_factor, recipe.resolved.seq_len, recipe.resolved.group_size) == (2, 512, 128)


def test_what_each_row_evaluates(saved_testbed, tmp_path):
    run = tmp_path / "run"
    spec = lambda name: ex.evaluated_model(ex.row_named(name), saved_testbed, run, 200)  # noqa: E731
    assert spec("base") == {"model": str(saved_testbed)}
    assert spec("pi") == {"model": str(saved_testbed), "rope_factor": 4.0}
    assert spec("longqlora") == {"model": str(saved_testbed), "adapter": str(run / "final"), "attention": "full"}
    assert spec("longqlora-s2-eval")["attention"] == "s2"
    assert spec("longqlora-quarter")["adapter"] == str(run / "checkpoint-50")  # run is longqlora-pi's here
    assert spec("full-ft") == {"model": str(run / "final"), "tokenizer": str(saved_testbed), "attention": "full"}
    assert ex.evaluated_model(ex.row_named("pi"), saved_testbed, run, 200, factor=2)["rope_factor"] == 2.0


@pytest.mark.parametrize("position, rope_type", [("dynamic", "dynamic"), ("yarn", "yarn")])
def test_zero_shot_variant_is_the_testbed_with_another_rope(saved_testbed, position, rope_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    variant = Path(ex.evaluated_model(ex.row_named("ntk" if position == "dynamic" else "yarn"), saved_testbed,
                                      None, 200)["model"])
    config = AutoConfig.from_pretrained(variant)
    assert config.rope_parameters["rope_type"] == rope_type and config.rope_parameters["factor"] == 4
    assert (variant / "model.safetensors").resolve() == (saved_testbed / "model.safetensors").resolve()
    AutoModelForCausalLM.from_pretrained(variant)  # loadable as it is
    assert tb.zero_shot_dir(saved_testbed, position, 1024) == variant  # cached


# --------------------------------------------------------------------------- bench bookkeeping

def records(values: dict) -> list[dict]:
    return [{"name": name, "length": length, "protocol": "strided", "ppl": ppl}
            for (name, length), ppl in values.items()]


def test_targets_from_records():
    from bench.testbed import targets

    found = targets(records({("base", 256): 10.0, ("longqlora", 1024): 10.4, ("qlora-full", 1024): 10.2,
                             ("longqlora-pi", 1024): 20.0, ("qlora-full-pi", 1024): 10.5,
                             ("longqlora-s2-eval", 1024): 12.0, ("longqlora-r8", 1024): 19.0}),
                    {"longqlora": {"tokens_per_s": 150.0}, "qlora-full": {"tokens_per_s": 100.0}}, native=256)
    assert found["longqlora_top_vs_base_1x"] == {"value": pytest.approx(1.04), "met": True}
    assert found["longqlora_top_vs_qlora_full"] == {"value": pytest.approx(10.4 / 10.2), "met": True}
    assert found["longqlora-pi_top_vs_base_1x"] == {"value": pytest.approx(2.0), "met": False}
    assert found["longqlora-pi_top_vs_qlora_full_pi"]["met"] is False
    assert found["longqlora_speed_vs_qlora_full"] == {"value": 1.5, "met": True}
    assert found["s2_at_inference_vs_full_top"]["met"] is False  # 12.0 < 20.0: S2 at inference reads 1024 better
    assert found["rank64_vs_rank8_top"]["met"] is False  # 20.0 > 19.0
    assert targets([], {}, native=256)["longqlora_top_vs_base_1x"] == {"value": None, "met": None}


def test_pose_targets_from_records():
    from bench.testbed import targets

    found = targets(records({("base", 256): 10.0, ("pose", 256): 10.05, ("pose", 4096): 10.4, ("longqlora", 4096): 10.2,
                             ("longqlora", 256): 10.2}),
                    {"pose": {"wall_s": 100.0}, "longqlora": {"wall_s": 400.0}}, native=256, factor=16)
    assert found["pose_top_vs_base_1x"] == {"value": pytest.approx(1.04), "met": True}
    assert found["pose_top_vs_longqlora"] == {"value": pytest.approx(10.4 / 10.2), "met": True}
    assert found["pose-quarter_top_vs_base_1x"] == {"value": None, "met": None}  # not run
    assert found["pose_wall_vs_longqlora"] == {"value": 0.25, "met": True}
    assert found["pose_1x_vs_base_1x"] == {"value": pytest.approx(1.005), "met": True}
    assert found["longqlora_1x_vs_base_1x"] == {"value": pytest.approx(1.02), "met": False}  # short context lost


def test_finished_evaluations_are_reused_until_settings_change(tmp_path, monkeypatch):
    import bench.testbed as bench
    from harness.evaluation.report import PplRecord

    calls = []

    def fake_compare(specs, data, settings):
        calls.append(specs[0])
        return [PplRecord(specs[0].label, None, settings.protocol, n, 5.0, 100) for n in settings.seq_lens]

    monkeypatch.setattr("harness.evaluation.compare_models", fake_compare)
    args = bench.parse_args(["--output", str(tmp_path), "--eval-tokens", "1000"])
    corpus = tb.Corpus(tmp_path, None, tmp_path / "held_out.txt")
    row = ex.row_named("base")
    first = bench.evaluate_row(row, {"model": "m"}, corpus, "strided", [64, 128], args)
    again = bench.evaluate_row(row, {"model": "m"}, corpus, "strided", [64, 128], args)
    assert first == again and len(calls) == 1
    assert first[0] == {"name": "base", "label": row.label, "protocol": "strided", "length": 64, "ppl": 5.0,
                        "tokens": 100}
    bench.evaluate_row(row, {"model": "other"}, corpus, "strided", [64, 128], args)
    assert len(calls) == 2


def test_run_stats_use_the_median_after_the_first_step(tmp_path):
    from bench.testbed import run_stats

    metrics = tmp_path / "metrics.jsonl"
    speeds = [10.0, 100.0, 300.0, 200.0]
    metrics.write_text("".join(json.dumps({"step": i + 1, "loss": 1.0, "tokens_per_s": s, "peak_memory_gib": 1 + i})
                               + "\n" for i, s in enumerate(speeds)))
    stats = run_stats(metrics)
    assert stats["tokens_per_s"] == 200.0 and stats["peak_memory_gib"] == 4 and stats["steps"] == 4


# --------------------------------------------------------------------------- the shortened grid

@pytest.mark.slow
def test_shortened_grid_base_pi_longqlora_at_2x(tmp_path):
    """A small testbed (4 layers, d=128, 150 steps of 8 x 256 tokens), then base, zero-shot PI x2 and
    LongQLoRA x2 (40 steps of 4 x 512 tokens) on the held-out book, strided, at 128, 256 and 512. Catches a rope
    factor lost on save
    (LongQLoRA would score like the base past 256), S2 left on at evaluation, an adapter not loaded
    (LongQLoRA would score like zero-shot PI)."""
    import bench.testbed as bench

    pretrain = ["model.init_config.hidden_size=128", "model.init_config.intermediate_size=320",
                "model.init_config.num_hidden_layers=4", "train.max_steps=150", "train.micro_batch_size=8",
                "train.eval_batches=20"]
    args = bench.parse_args(["--rows", "base,pi,longqlora", "--factor", "2", "--steps", "40", "--shares", "0.5,1,2",
                             "--protocols", "strided", "--eval-tokens", "8000", "--output", str(tmp_path),
                             "--train=train.micro_batch_size=4",
                             *(f"--pretrain={o}" for o in pretrain)])
    _, found, _ = bench.run_grid(args)
    ppl = lambda name, n: bench.ppl(found, name, n)  # noqa: E731
    # the base degrades past its window (this small, 150-step testbed only a little: 11.74 against 11.59 measured)
    assert ppl("base", 512) > ppl("base", 256)
    assert ppl("pi", 128) > 1.02 * ppl("base", 128)  # zero-shot PI costs perplexity at short lengths
    lost = ppl("pi", 512) - ppl("base", 256)
    assert lost > 0
    assert ppl("pi", 512) - ppl("longqlora", 512) > 0.5 * lost  # LongQLoRA recovers most of PI's loss at 2x


@pytest.mark.slow
def test_the_default_longqlora_holds_under_full_attention_at_2x(tmp_path):
    """The demo's testbed (300 pretraining steps on the shipped books), extended 2x by the default recipe
    (YaRN + NF4 + LoRA + S2, 150 steps of 4 x 512 tokens), read with full attention on the held-out book.
    Measured on the 2-core CPU (bench/results/testbed_transfer_x2.json, 200 steps): the base 7.76 at 256
    and 8.28 at 512, the default 7.79 at 512. The paper's PI + S2 read 512 at 8.44 there, and at 8.23 with
    this test's 150 steps (the base 7.72 / 8.23): it fails both bounds below."""
    import bench.testbed as bench

    args = bench.parse_args(["--rows", "base,longqlora", "--factor", "2", "--steps", "150", "--shares", "1,2",
                             "--protocols", "strided", "--eval-tokens", "20000", "--output", str(tmp_path),
                             "--train=train.micro_batch_size=4", "--pretrain=train.max_steps=300"])
    _, found, _ = bench.run_grid(args)
    ppl = lambda name, n: bench.ppl(found, name, n)  # noqa: E731
    assert ppl("base", 512) > 1.04 * ppl("base", 256)  # the testbed degrades past its window
    assert ppl("longqlora", 512) <= 1.03 * ppl("base", 256)  # 2x its window at about its own perplexity...
    assert ppl("longqlora", 512) <= 0.97 * ppl("base", 512)  # ...and clearly better than the base there


@pytest.mark.slow
def test_pose_at_4x_holds_under_full_attention(tmp_path):
    """Train short, read long: the demo's testbed (300 pretraining steps) extended 4x by PoSE + YaRN QLoRA,
    trained only in 256-token windows of 1024-token samples (80 steps of 2 windows), read with full
    attention at 1024 on the held-out book. Measured in the grid (bench/results/pose_x4.json, the same
    settings): the base 7.84 at 256, PoSE 8.06 at 1024 (+2.7%), zero-shot YaRN 8.42 there."""
    import bench.testbed as bench

    args = bench.parse_args(["--rows", "base,yarn,pose", "--factor", "4", "--steps", "80", "--shares", "1,4",
                             "--protocols", "strided", "--eval-tokens", "20000", "--output", str(tmp_path),
                             "--pretrain=train.max_steps=300", "--train=train.eval_every=0"])
    _, found, _ = bench.run_grid(args)
    ppl = lambda name, n: bench.ppl(found, name, n)  # noqa: E731
    assert ppl("pose", 1024) <= 1.05 * ppl("base", 256)  # 4x the window within 5% of the base at its own
    assert ppl("pose", 1024) <= 0.98 * ppl("yarn", 1024)  # and better than the same rope untrained


def test_runs_are_named_by_their_settings_and_a_finished_one_is_reused(tmp_path):
    assert ex.run_dir_name("longqlora-pi", 4, 400) == "longqlora-pi-x4-400steps"
    other = ex.run_dir_name("longqlora-pi", 4, 400, ["train.micro_batch_size=2"])
    assert other.startswith("longqlora-pi-x4-400steps-") and len(other) == len("longqlora-pi-x4-400steps-") + 8
    run_dir = tmp_path / "run"
    assert ex.finished_run(run_dir) is None
    (run_dir / "final").mkdir(parents=True)
    corpus = tb.Corpus(tmp_path, None, tmp_path / "held_out.txt")
    # no testbed exists at tmp_path / "none": training would fail, the finished run is returned as it is
    reused = ex.train_or_reuse(ex.row_named("longqlora"), tmp_path / "none", corpus, run_dir, steps=5)
    assert reused == run_dir / "final"
