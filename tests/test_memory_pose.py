"""The memory planner under PoSE (layout.name = "pose"): training planned at the window, the held-out
evaluation at the target, and the longest target a card reaches with PoSE against without it.

Hand-computed bytes for stated shapes, torch's CPU allocator over the loop's own step (at the window) and
evaluation (at the target), and the reach checked against plan() itself at and past the found length.
"""
from __future__ import annotations

import json
import math

import pytest

from harness.cli.plan_memory import main as plan_memory
from harness.loop_memory import allocator_peak, eval_allocator_peak, training_loop
from harness.memory import eval_verdict, plan, pose_window
from harness.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("session_cache")
POSE = "recipes/llama3_8b_64k_pose.toml"
GIB = 2**30


def pose(*overrides: str):
    return load_recipe(POSE, list(overrides))


def test_training_is_planned_at_the_window_and_the_evaluation_at_the_target():
    """Llama-3-8B (d = 4096, I = 14336, D = 128, 32 layers), window 8192, target 65536, bf16 under DeepSpeed on
    an Ampere-class 24 GiB card: the step checkpoints 32 x (1, 8192, d) x 2 B; the no-grad forward at 65536
    peaks in one layer's MLP: 4 x (1, L, I) x 2 B while up_proj's LoRA branch runs, the residual sum and its
    norm (2 x (1, L, d) x 2 B), the embedding output and the layer's input (2 x (1, L, d) x 2 B), RoPE's cos
    and sin (2 x (1, L, D) x 2 B) and the batch's four (1, L) int64 tensors."""
    result = plan(pose(), gpu_gib=24)
    window, target = 8192, 65536
    assert (result.seq_len, result.evaluation.seq_len) == (window, target)
    assert result.part_bytes("checkpointed hidden states") == 32 * window * 4096 * 2 == 2 * GIB
    forward = target * (8 * 14336 + 4 * 4096) + target * (2 * 4096 + 2 * 128) * 2 + target * 32
    assert result.evaluation.peak_phase == "eval mlp" and result.evaluation.dynamic_bytes == forward
    assert result.fits and result.evaluation.fits and result.evaluation.peak_bytes > result.peak_bytes


def test_the_pose_step_is_a_contiguous_step_at_the_window():
    """Skipped positions change no tensor: the step's every line is that of the same recipe trained
    contiguously at 8192 tokens; only the evaluation's length differs."""
    short = pose('layout.name="contiguous"', "data.max_seq_length=8192", "position.target_length=8192")
    pose_plan, contiguous = plan(pose(), gpu_gib=24), plan(short, gpu_gib=24)
    assert [(p.name, p.bytes) for p in pose_plan.parts] == [(p.name, p.bytes) for p in contiguous.parts]
    assert contiguous.evaluation.seq_len == 8192 < pose_plan.evaluation.seq_len


def test_prediction_matches_a_measured_cpu_step_at_the_window_and_evaluation_at_the_target():
    """tiny_cpu trained with PoSE in a 512-token window of 2048-token samples: the planner's step against
    torch's CPU allocator over two of the loop's steps at the window, its evaluation against the loop's
    evaluator over one held-out sample at the target (every reading: full attention at 2048, windows of the
    original 256, S2)."""
    recipe = load_recipe("recipes/tiny_cpu.toml", ['layout.name="pose"', "data.max_seq_length=512",
                                                   "position.target_length=2048", "train.grad_accum=1",
                                                   "train.cpu_cache_mib=0"])
    loop = training_loop(recipe)
    step, evaluation = allocator_peak(loop), eval_allocator_peak(loop)
    planned = plan(loop.recipe, device="cpu")
    # measured here: step 3,902,976 planned vs 3,887,588 (+0.4 %); evaluation 6,619,136 vs 6,635,476 (-0.25 %)
    assert (planned.seq_len, planned.evaluation.seq_len) == (512, 2048)
    assert planned.dynamic_bytes == pytest.approx(step, rel=0.01)  # measured +0.4%
    assert planned.evaluation.dynamic_bytes == pytest.approx(evaluation, rel=0.01)  # measured -0.25%


@pytest.mark.parametrize("gib, documented", [(24, (31744, 126976)), (32, (46080, 185344))])
def test_the_longest_target_is_where_plan_stops_fitting(gib, documented):
    """With PoSE the step is the window's whatever the target, so plan() at the found target fits, training
    and evaluation, and 10% further the evaluation does not; trained at the target, the step stops fitting."""
    reach = plan(pose(), gpu_gib=gib).reach
    assert reach.window == 8192 and reach.window_peak < gib * GIB and reach.pose > reach.contiguous > reach.window
    assert (reach.contiguous, reach.pose) == documented  # docs/recipes.md and docs/memory.md print these

    at, past = plan(pose(f"position.target_length={reach.pose}"), gpu_gib=gib), \
        plan(pose(f"position.target_length={math.ceil(1.1 * reach.pose)}"), gpu_gib=gib)
    assert at.fits and at.evaluation.fits and at.evaluation.seq_len == reach.pose
    assert past.fits and not past.evaluation.fits  # the step at the window still fits

    def contiguous(length: int):
        return plan(pose('layout.name="contiguous"', f"data.max_seq_length={length}",
                         f"position.target_length={length}"), gpu_gib=gib)

    at, past = contiguous(reach.contiguous), contiguous(math.ceil(1.1 * reach.contiguous))
    assert at.fits and at.evaluation.fits and not past.fits


def test_a_recipe_without_pose_is_compared_at_its_original_context():
    """llama3_8b_32k trains contiguously with S2: its PoSE window is the base's 8192 tokens, and the target that
    window reaches is the PoSE recipe's (the forward at the target is the limit, and it is the same forward);
    a recipe whose length is its original context takes a quarter of it."""
    recipe = load_recipe("recipes/llama3_8b_32k.toml")
    assert pose_window(recipe, 32768) == (8192, "the original context")
    assert plan(recipe, gpu_gib=24).reach.pose == plan(pose(), gpu_gib=24).reach.pose
    assert pose_window(load_recipe("recipes/testbed_pretrain.toml"), 256) == (64, "a quarter of the planned length")
    assert pose_window(pose(), 8192) == (8192, "the recipe's training window")


def test_the_eval_verdict_names_the_target():
    """At 256k the step at the window still fits 24 GiB; the forward at the target does not."""
    result = plan(pose("position.target_length=262144"), gpu_gib=24)
    assert result.fits and not result.evaluation.fits
    assert eval_verdict(result).startswith("The held-out evaluation does not fit: full attention at 262144 tokens")


def test_cli_prints_the_reach_and_json_carries_it(capsys):
    reach = plan(pose(), gpu_gib=24).reach
    assert plan_memory([POSE, "--gib", "24"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "evaluation (1 x 65536, full attention, no grad)" in printed
    assert "predicted peak 11.13 GiB, the held-out evaluation's 15.41 GiB at 65536 tokens (fits)" in printed
    assert (f"Longest target on 24 GiB (multiples of 1024, the full-attention forward at the target included): "
            f"{reach.contiguous} tokens trained at the target, {reach.pose} with PoSE (layout.name = \"pose\") "
            f"training a window of 8192 tokens (the recipe's training window), whose step peaks at 11.13 GiB; "
            f"the forward at the target is then the limit.") in printed

    assert plan_memory([POSE, "--gib", "24", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["seq_len"] == 8192 and planned["evaluation"]["seq_len"] == 65536
    assert planned["reach"] == {"contiguous": reach.contiguous, "pose": reach.pose, "window": 8192,
                                "window_source": "the recipe's training window", "window_peak": reach.window_peak}
