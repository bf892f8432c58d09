"""Layout backends: PoSE windows against the sample they come from, packed documents kept apart,
seeded draws, the recipe's checks, and a PoSE run that resumes bit for bit."""
from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch

from harness import registry
from harness.backends.token_masks import tokens_of
from harness.backends.layout import Layout, short_documents
from harness.recipe import RecipeError, load_recipe
from harness.train import train
from tests.test_train import adapter, losses, sigterm_at

pytestmark = pytest.mark.usefixtures("session_cache")


def document(n: int, first: int = 100) -> dict:
    ids = list(range(first, first + n))  # a token's id says where in the text it was
    return {"input_ids": ids, "labels": ids, "position_ids": list(range(n))}


def pose_recipe(*overrides: str):
    """recipes/tiny_cpu.toml (512-token target) trained with PoSE in 128-token windows."""
    return load_recipe("recipes/tiny_cpu.toml", ["layout.name=\"pose\"", "data.max_seq_length=128", *overrides])


def pose(window: int, chunks: int = 2, seed: int = 0) -> Layout:
    return registry.get("layout", "pose").fn(window=window, seed=seed, chunks=chunks)


@pytest.mark.parametrize("chunks", [2, 3, 5])
def test_a_pose_window_is_the_sample_s_own_tokens_at_their_own_positions(chunks):
    sample = document(1024)
    for index in range(200):
        out = pose(64, chunks)(sample, epoch=0, index=index)
        ids, labels, positions = (np.asarray(out[k]) for k in ("input_ids", "labels", "position_ids"))
        assert len(ids) == len(labels) == len(positions) == 64
        assert (ids - 100 == positions).all()  # each token at the position it had in the text
        assert positions[0] == 0 and (np.diff(positions) >= 1).all()
        assert positions[-1] - 63 <= 1024 - 64  # the skips add up to at most n - window: inside the target
        jumps = np.flatnonzero(np.diff(positions) > 1) + 1  # where a gap was skipped
        not_targets = np.flatnonzero(labels == -100)
        assert set(jumps) == set(not_targets)  # exactly where a skip was taken: a later chunk's first token
        assert (labels[labels != -100] == ids[labels != -100]).all()


def test_over_many_samples_pose_reaches_every_distance_of_the_target():
    """The paper's point: a 64-token window covers relative distances up to the 1024-token target."""
    spans = [pose(64)(document(1024), epoch=0, index=i)["position_ids"][-1] for i in range(2000)]
    assert min(spans) < 80  # some windows skip (almost) nothing
    assert max(spans) > 1000  # some reach the end of the target
    counts, _ = np.histogram(spans, bins=4, range=(63, 1024))
    assert counts.min() > 300  # spread over the range, not bunched at one end (2000 draws, 4 bins)


def test_draws_are_a_function_of_seed_epoch_and_index():
    sample, layout = document(512), pose(64)
    assert layout(sample, epoch=1, index=7) == layout(sample, epoch=1, index=7)
    assert layout(sample, epoch=1, index=7) != layout(sample, epoch=2, index=7)
    assert layout(sample, epoch=1, index=7) != pose(64, seed=1)(sample, epoch=1, index=7)


def test_a_sample_no_longer_than_the_window_is_kept_whole():
    sample = document(60)
    assert pose(64)(sample, epoch=0, index=0) is sample


def test_packed_documents_are_never_joined_by_a_skip():
    """A packed row's positions restart at each document; after the skip, the attention's documents (read
    from position 0s) must never hold tokens of two source documents."""
    lengths = [40, 7, 300, 3, 500, 174]
    source = np.repeat(np.arange(len(lengths)), lengths)  # (1024,) which document each token came from
    row = {"input_ids": list(range(1024)), "labels": list(range(1024)),
           "position_ids": [p for n in lengths for p in range(n)]}
    for index in range(500):
        out = pose(48, chunks=3)(row, epoch=0, index=index)
        kept_source = source[np.asarray(out["input_ids"])]
        positions = torch.tensor([out["position_ids"]])
        seen = tokens_of(None, positions, torch.zeros(1, 1, len(out["input_ids"]), 1)).doc[0].numpy()
        for doc in np.unique(seen):
            assert len(set(kept_source[seen == doc])) == 1, (index, out["position_ids"])


def test_contiguous_is_the_default_and_changes_nothing():
    recipe = load_recipe("recipes/tiny_cpu.toml")
    assert recipe.layout.name == "contiguous" and recipe.resolved.sample_length == recipe.resolved.seq_len
    layout = registry.get("layout", "contiguous").fn(window=256, seed=0)
    sample = document(512)
    assert layout(sample, epoch=3, index=5) is sample


def test_pose_reads_samples_at_the_target_and_trains_in_the_window():
    recipe = load_recipe("recipes/tiny_cpu.toml", ["layout.name=\"pose\"", "data.max_seq_length=128"])
    assert (recipe.resolved.seq_len, recipe.resolved.sample_length, recipe.resolved.group_size) == (128, 512, 32)


@pytest.mark.parametrize("overrides, message", [
    (["data.max_seq_length=0"], r"data.max_seq_length = 0 \(= position.target_length, 512\).*set data.max_seq_length"),
    (["data.max_seq_length=512"], r"window shorter than the target.*512"),
    (["data.max_seq_length=128", "layout.chunks=1"], r"layout.chunks = 1 must be between 2"),
    (["data.max_seq_length=128", "layout.chunks=65"],
     r"layout.chunks = 65 must be between 2 and 64, half the window.*use layout.chunks = 2"),
    (["data.max_seq_length=128", "data.name=\"sft\""], r"data.name = 'sft'.*contiguous"),
    (["data.max_seq_length=1024"], r"longer than position.target_length = 512, but layout.name = 'pose'.*lower "
                                   r"data.max_seq_length, e.g. to 128"),
    (["data.max_seq_length=128", "position.name=\"none\""], r"past the model's 256-token context, but "
                                                            r"position.name = 'none'.*use position.name = 'yarn'"),
])
def test_a_pose_recipe_that_cannot_work_is_refused_by_key(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("recipes/tiny_cpu.toml", ["layout.name=\"pose\"", *overrides])


def test_a_misspelt_layout_names_the_one_meant():
    with pytest.raises(RecipeError, match=r"layout.name = 'posse' is not a known layout backend. Did you mean 'pose'"):
        load_recipe("recipes/tiny_cpu.toml", ["layout.name=\"posse\""])


def test_pose_within_the_model_s_own_context_needs_no_stretched_rope():
    recipe = pose_recipe("position.name=\"none\"", "position.target_length=256")
    assert (recipe.resolved.seq_len, recipe.resolved.sample_length) == (128, 256)


def test_pose_with_dynamic_ntk_is_warned_of_its_moving_rope(caplog):
    with caplog.at_level(logging.WARNING, logger="harness"):
        pose_recipe("position.name=\"yarn\"")
    assert "moving rope" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="harness"):
        pose_recipe("position.name=\"dynamic\"")
    assert "recipes/tiny_cpu.toml: position.name = 'dynamic' rescales the rope by each batch's largest position" in \
        caplog.text


def test_documents_shorter_than_the_target_are_counted():
    assert short_documents([512, 600, 4096], 512) == ""
    warning = short_documents([511, 512, 100, 4096], 512)
    assert warning.startswith("PoSE: 2 of the 4 training documents are shorter than the target of 512 tokens")
    assert warning.endswith("(data.min_tokens = 512)")


def test_a_pose_run_on_short_documents_says_so(tmp_path, capsys):
    from harness.loop import Loop
    from harness.session import build_session

    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"text": "a short document. " * 16}) + "\n" for _ in range(24)))
    Loop(build_session(pose_recipe(f"data.path=\"{data}\"", "data.mode=\"truncate\"",
                                   f"train.output_dir=\"{tmp_path / 'run'}\"", "train.max_steps=1")))
    printed = " ".join(capsys.readouterr().err.split())
    assert "PoSE: each training sample is a 128-token window of up to 512 tokens" in printed
    every = re.search(r"PoSE: (\d+) of the (\d+) training documents are shorter than the target of 512 tokens", printed)
    assert every and every.group(1) == every.group(2) and int(every.group(1)) > 0  # 288-byte documents, all short


def test_chunks_with_the_contiguous_layout_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="harness"):
        load_recipe("recipes/tiny_cpu.toml", ["layout.chunks=3"])
    assert "layout.chunks = 3 has no effect with layout.name = 'contiguous'" in caplog.text


def test_a_pose_run_resumes_bit_for_bit(tmp_path):
    run = ["train.max_steps=4", "train.save_every=2"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(pose_recipe(f"train.output_dir=\"{straight}\"", *run))
    train(pose_recipe(f"train.output_dir=\"{stopped}\"", *run), after_step=sigterm_at(2))
    train(pose_recipe(f"train.output_dir=\"{stopped}\"", *run, "train.resume=\"auto\""))
    assert losses(stopped) == losses(straight)
    final_a, final_b = adapter(straight / "final"), adapter(stopped / "final")
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        torch.testing.assert_close(final_a[name], final_b[name], rtol=0, atol=0)


@pytest.mark.parametrize("position, attention", [("linear", "full"), ("dynamic", "s2"), ("yarn", "full"),
                                                 ("llama3", "s2")])
def test_pose_trains_with_every_position_method_and_attention(tmp_path, position, attention):
    train(pose_recipe(f"train.output_dir=\"{tmp_path}\"", f"position.name=\"{position}\"",
                      f"attention.name=\"{attention}\"", "train.max_steps=2", "train.eval_holdout=0"))
    assert all(np.isfinite(losses(tmp_path))) and (tmp_path / "final" / "adapter_model.safetensors").is_file()


def test_a_pose_run_trains_on_skipped_windows_and_watches_whole_samples(tmp_path, monkeypatch, capsys):
    """What the loop computes under PoSE: 128-token micro-batches whose positions jump past the window
    (never past the 512 target) with no target at the jump; what the watch scores: whole 512-token
    held-out samples at positions 0..511."""
    from harness.evaluation.in_training import LongContextEval
    from harness.loop import Loop

    trained, scored = [], []
    train_step, evaluate = Loop.train_step, LongContextEval.run

    def recorded_step(self, micro_batches):
        return train_step(self, (trained.append(batch) or batch for batch in micro_batches))

    def recorded_eval(self, module, samples):
        scored.extend(samples)
        return evaluate(self, module, samples)

    monkeypatch.setattr(Loop, "train_step", recorded_step)
    monkeypatch.setattr(LongContextEval, "run", recorded_eval)
    train(pose_recipe(f"train.output_dir=\"{tmp_path}\"", "train.max_steps=2"))

    printed = " ".join(capsys.readouterr().err.split())
    assert "PoSE: each training sample is a 128-token window of up to 512 tokens" in printed
    assert "shorter than the target" not in printed  # the book's excerpt is one document past the target
    assert trained and all(batch["input_ids"].shape[1] == 128 for batch in trained)
    last = []
    for positions, labels in ((b["position_ids"][0], b["labels"][0]) for b in trained):
        jumps = torch.nonzero(positions.diff() > 1).flatten() + 1
        assert len(jumps) <= 1 and (labels[jumps] == -100).all()  # at most one skip (2 chunks), never a target
        last.append(int(positions[-1]))
    assert max(last) >= 128 and max(last) < 512  # positions past the window, inside the target
    assert scored and all(sample["position_ids"] == list(range(512)) for sample in scored)
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval_ppl" in line]
    assert evals and all(record["eval_length"] == 512 for record in evals)


def test_the_auto_watch_counts_a_held_out_sample_as_long_as_the_target(tmp_path, capsys):
    """eval_every = -1 keeps the watch near 5% of the training time: the same held-out readings (512 tokens)
    against training samples of 512, or under PoSE of 128 (4 times cheaper): the watch comes 4 times less often."""
    from harness.loop import Loop
    from harness.session import build_session

    def cadence(*overrides: str) -> int:
        Loop(build_session(load_recipe("recipes/tiny_cpu.toml", [f"train.output_dir=\"{tmp_path}\"",
                                                                 "train.max_steps=1000", *overrides])))
        return int(re.search(r"every (\d+) steps", capsys.readouterr().err).group(1))

    assert cadence("layout.name=\"pose\"", "data.max_seq_length=128") == 4 * cadence("data.max_seq_length=512")
