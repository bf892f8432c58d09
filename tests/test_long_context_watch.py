"""The long-context watch in every run: held-out perplexity at the target without any setting.

A recipe that names no held-out data gets train.eval_holdout (4) target-length samples of its
training data held out (never trained on, named in the output, part of the resume
fingerprint), scored with full attention at the target, in windows of the original context
and under S2, every N steps (N from harness.policy.eval_cadence: about 5% of the training time)
and at the last step.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from harness import policy
from harness.recipe import load_recipe
from harness.session import build_session
from harness.train import train

pytestmark = pytest.mark.usefixtures("session_cache")


def tiny(output_dir: Path, *overrides: str):
    return load_recipe("recipes/tiny_cpu.toml", [f"train.output_dir=\"{output_dir}\"", "train.save_every=0",
                                                 *overrides])


def rows(output_dir: Path, key: str) -> list[dict]:
    return [r for r in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_a_recipe_without_held_out_data_is_watched_at_the_target(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny(out, "train.max_steps=2"))
    [record] = rows(out, "eval_ppl")
    assert record["step"] == 2 and record["eval_length"] == 512  # the target, tiny_cpu's data.max_seq_length
    assert {"eval_ppl_window", "eval_ppl_s2"} <= record.keys() and math.isfinite(record["eval_ppl"])
    err = " ".join(capsys.readouterr().err.split())
    assert "Held out 4 training samples of data.path (indices" in err and "never trained on" in err
    assert "Long-context watch: 1 of the 4 held-out samples" in err  # 2 steps afford one (policy.eval_samples_within)


def test_held_out_samples_are_target_length_and_never_trained_on():
    session = build_session(tiny(Path("unused")))
    data = session.data
    assert len(data.held_out) == 4 and set(data.held_out).isdisjoint(data.train.indices)
    assert len(data.train) + 4 == len(data.train.samples)
    assert all(len(data.eval[i]["input_ids"]) == 512 for i in range(4))


def test_eval_holdout_0_turns_the_watch_off(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, "train.max_steps=1", "train.eval_holdout=0"))
    assert rows(out, "eval_ppl") == []


def test_the_auto_cadence_keeps_evaluation_near_five_percent():
    # 4 samples x 3 readings = 12 forwards; a step of 2 x 8 samples with checkpointing = 64 forwards: 12 / 64 > 5%
    assert policy.eval_cadence(samples=4, readings=3, micro_batch_size=2, grad_accum=8, checkpointing=True) == 4
    assert policy.eval_cadence(samples=4, readings=3, micro_batch_size=2, grad_accum=8, checkpointing=False) == 5
    assert policy.eval_cadence(samples=1, readings=1, micro_batch_size=64, grad_accum=64, checkpointing=True) == 1


def test_a_short_run_scores_what_its_share_buys():
    # 5% of 100 steps x 2 samples x 3 forwards = 30 forwards = 10 samples x 3 readings
    assert policy.eval_samples_within(100, readings=3, micro_batch_size=2, grad_accum=1, checkpointing=False) == 10
    # llama2_13b_12k: 5% of 1000 steps x 16 samples x 4 forwards, over 3 readings: far more than its 4 samples
    assert policy.eval_samples_within(1000, readings=3, micro_batch_size=1, grad_accum=16, checkpointing=True) == 1066
    assert policy.eval_samples_within(2, readings=3, micro_batch_size=1, grad_accum=2, checkpointing=True) == 1


def test_resume_refuses_other_held_out_samples(tmp_path):
    from harness.resume import ResumeError

    out = tmp_path / "run"
    train(tiny(out, "train.max_steps=2", "train.save_every=1", "train.eval_every=0"))
    with pytest.raises(ResumeError, match="train.eval_holdout 4 -> 6"):
        train(tiny(out, "train.max_steps=3", "train.save_every=1", "train.eval_every=0", "train.eval_holdout=6",
                   "train.resume=\"auto\""))


def test_a_held_out_file_shorter_than_the_target_says_so(tmp_path, capsys, caplog):
    short = tmp_path / "short.txt"
    short.write_text("x" * 24)
    train(tiny(tmp_path / "run", "train.max_steps=1", f"data.eval_path=\"{short}\""))
    err = " ".join(capsys.readouterr().err.split())
    assert "held-out perplexity" in err and "at 26 tokens (full attention)" in err and "at 512 tokens" not in err
    assert f"data.eval_path = '{short}': the eval split holds 26 tokens" in caplog.text


def test_a_held_out_file_with_nothing_to_predict_is_one_line(tmp_path):
    from harness.data import DataError

    tiny_file = tmp_path / "one.txt"
    tiny_file.write_text("x")
    with pytest.raises(DataError, match="data.eval_path = .*one.txt': the eval split holds 1 tokens in 1 samples"):
        train(tiny(tmp_path / "run", "train.max_steps=1", f"data.eval_path=\"{tiny_file}\"", "data.add_bos=false",
                   "data.add_eos=false"))


def test_an_evaluation_out_of_gpu_memory_is_skipped_and_training_goes_on(tmp_path, capsys, monkeypatch):
    from harness.evaluation.in_training import LongContextEval

    def out_of_memory(self, module, samples):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(LongContextEval, "run", out_of_memory)
    out = tmp_path / "run"
    train(tiny(out, "train.max_steps=3", "train.eval_every=1"))
    assert (out / "final").is_dir() and len(rows(out, "loss")) == 3 and rows(out, "eval_ppl") == []
    err = " ".join(capsys.readouterr().err.split())
    assert "The held-out evaluation at step 1 ran out of GPU memory: skipped for the rest of the run" in err


def test_resume_onto_changed_data_says_the_held_out_samples_were_drawn_anew(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(Path("recipes/data/the_complete_angler_excerpt.txt").read_text())
    out, common = tmp_path / "run", (f"data.path=\"{data}\"", "train.save_every=1", "train.eval_every=0")
    train(tiny(out, "train.max_steps=2", *common))
    (out / "final").rename(tmp_path / "first-final")
    with data.open("a") as text:
        text.write(" more words about fishing." * 400)
    capsys.readouterr()
    train(tiny(out, "train.max_steps=3", *common, "train.resume=\"auto\"", "train.allow_data_change=true"))
    err = " ".join(capsys.readouterr().err.split())
    assert "resuming anyway (train.allow_data_change = true). The held-out samples were drawn anew" in err


def test_a_resumed_run_keeps_the_evaluation_plan_it_started_with(tmp_path):
    """Auto: a 2-step run scores 1 sample; resumed to 40 steps it still scores that one, so the curve reads
    one set (a 40-step run from the start would score all 4)."""
    out = tmp_path / "run"
    train(tiny(out, "train.max_steps=2", "train.save_every=1"))
    (out / "final").rename(tmp_path / "first-final")
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["evaluations"]["count"] == 1
    train(tiny(out, "train.max_steps=40", "train.save_every=39", "train.resume=\"auto\""))
    assert json.loads((out / "checkpoint-39" / "trainer_state.json").read_text())["evaluations"] == state["evaluations"]


def test_a_holdout_larger_than_a_tenth_of_the_data_is_capped_and_said(capsys):
    session = build_session(tiny(Path("unused"), "train.eval_holdout=1000"))
    held = len(session.data.held_out)
    assert held == (held + len(session.data.train)) // 10
    err = " ".join(capsys.readouterr().err.split())
    assert f"Held out {held} training samples (train.eval_holdout = 1000: at most 1 sample in 10 is held out)" in err
