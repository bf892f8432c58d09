"""`launch/train.py RECIPE --dry-run` shows the batch a run of this launch trains with: under sequence
parallelism the ranks of a group share each micro-batch, so the effective batch and the tokens per step
count the data-parallel replicas (WORLD_SIZE / engine.sequence_parallel_size), as build_session does."""
from __future__ import annotations

from harness import policy
from harness.cli.train import main
from harness.recipe import load_recipe, with_launch_facts
from tests.conftest import ROOT

SEQUENCE_PARALLEL = ['engine.name="deepspeed"', 'engine.deepspeed_config="launch/deepspeed/zero2_sp.json"',
                     "engine.sequence_parallel_size=2", "train.micro_batch_size=3", "train.grad_accum=5"]


def shown(out: str) -> dict[str, str]:
    """{key: value} of the dry run's table."""
    rows = ([cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│"))
    return {row[0]: row[1] for row in rows if len(row) == 2}


def test_a_dry_run_under_sequence_parallelism_shows_the_batch_training_counts(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["recipes/tiny_cpu.toml", *SEQUENCE_PARALLEL, "--dry-run"]) == 0
    table = shown(capsys.readouterr().out)
    replicas = 4 // 2  # 4 ranks in groups of 2 that share each micro-batch
    effective = 3 * 5 * replicas  # micro_batch_size x grad_accum x replicas
    seq_len = 512  # data.max_seq_length of recipes/tiny_cpu.toml
    assert (table["resolved.world_size"], table["resolved.effective_batch_size"], table["resolved.tokens_per_step"]) \
        == (str(replicas), str(effective), str(effective * seq_len))

    # what build_session records: the recipe with the engine's data_world_size (4 / 2) and the base's window
    trained = with_launch_facts(load_recipe("recipes/tiny_cpu.toml", SEQUENCE_PARALLEL),
                                world_size=policy.data_world_size(4, 2),  # what the deepspeed engine reports
                                original_context=256, weights_dtype="fp32")
    assert (trained.resolved.effective_batch_size, trained.resolved.tokens_per_step) == (effective, effective * seq_len)


def test_a_dry_run_without_sequence_parallelism_counts_every_launched_rank(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["recipes/tiny_cpu.toml", "train.micro_batch_size=3", "train.grad_accum=5", "--dry-run"]) == 0
    table = shown(capsys.readouterr().out)
    assert (table["resolved.world_size"], table["resolved.effective_batch_size"]) == ("4", str(3 * 5 * 4))


def test_a_pose_dry_run_says_what_it_will_train(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["recipes/tiny_cpu.toml", "--dry-run"]) == 0
    assert "PoSE" not in capsys.readouterr().out
    assert main(["recipes/tiny_cpu.toml", 'layout.name="pose"', "data.max_seq_length=128", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "PoSE: each training sample is a 128-token window of up to 512 tokens, in 2 chunks" in out
    assert (shown(out)["resolved.seq_len"], shown(out)["resolved.sample_length"]) == ("128", "512")
