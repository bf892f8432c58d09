"""Sequence parallelism's single-process parts: S2 by head windows, batch sharding, checks, tiled MLP.

Head windows: under Ulysses rank r of N holds query heads [r H/N, (r + 1) H/N) and its KV heads
(DeepSpeed's split, or one KV head replicated over N / H_kv ranks). S2 on each window, with its
HeadWindow, must give exactly those heads of S2 over all heads in one call, computed by the dense
eager kernel (the reference of tests/backends/test_s2.py), for every kernel and with padding and
packed documents. The 2-rank runs are tests/distributed/test_sequence_parallel.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from harness.backends.s2 import HeadWindow, shift_short_attention
from harness.backends.sequence_parallel import (
    SequenceParallelError, SequenceShards, check_heads, check_world, pad_to_multiple,
)
from harness.recipe import RecipeError, load_recipe

TINY = "recipes/tiny_cpu.toml"


def rank_heads(query, key, value, rank: int, size: int):
    """What Ulysses hands rank `rank`: its query heads and its KV heads (replicated when H_kv < N)."""
    heads, kv_heads = query.shape[1], key.shape[1]
    local = heads // size
    q = query[:, rank * local:(rank + 1) * local]
    if kv_heads >= size:
        kv = slice(rank * kv_heads // size, (rank + 1) * kv_heads // size)
    else:
        first = rank // (size // kv_heads)
        kv = slice(first, first + 1)
    return q, key[:, kv], value[:, kv], HeadWindow(rank * local, heads, kv_heads)


def masks(batch: int, length: int, case: str):
    if case == "plain":
        return None, None
    if case == "padding":
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[0, length - 7:] = False
        return mask, None
    positions = torch.cat([torch.arange(length // 3), torch.arange(length - length // 3)])  # two documents
    return None, positions[None].expand(batch, length)


@pytest.mark.parametrize("heads,kv_heads,size", [(4, 2, 2), (8, 2, 4), (4, 1, 2), (8, 8, 4), (9, 3, 3), (12, 3, 6),
                                                 (6, 6, 2)])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["plain", "padding", "packed"])
def test_head_windows_together_are_s2_over_all_heads(heads, kv_heads, size, kernel, case):
    torch.manual_seed(heads * 100 + kv_heads * 10 + size)
    batch, length, dim, group = 2, 48, 8, 16
    query = torch.randn(batch, heads, length, dim, dtype=torch.float64)
    key, value = (torch.randn(batch, kv_heads, length, dim, dtype=torch.float64) for _ in range(2))
    mask, positions = masks(batch, length, case)
    reference = shift_short_attention(query, key, value, group, mask, positions, kernel="eager")  # (B, L, H, D)
    local = heads // size
    for rank in range(size):
        q, k, v, window = rank_heads(query, key, value, rank, size)
        out = shift_short_attention(q, k, v, group, mask, positions, kernel=kernel, head_window=window)
        torch.testing.assert_close(out, reference[:, :, rank * local:(rank + 1) * local], atol=1e-12, rtol=0)


def test_a_window_of_all_heads_is_the_plain_call():
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 9, 40, 8), torch.randn(1, 3, 40, 8), torch.randn(1, 3, 40, 8)
    plain = shift_short_attention(query, key, value, 10, kernel="sdpa")
    windowed = shift_short_attention(query, key, value, 10, kernel="sdpa", head_window=HeadWindow(0, 9, 3))
    assert torch.equal(plain, windowed)


def test_a_window_that_cuts_a_kv_group_is_refused():
    query, key = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="whole KV groups"):
        shift_short_attention(query, key, key, 8, kernel="eager", head_window=HeadWindow(1, 8, 4))


# --------------------------------------------------------------------------- batch sharding

def collated(lengths: list[int]):
    from harness.data.collate import Collator

    items = [{"input_ids": list(range(10, 10 + n)), "labels": list(range(10, 10 + n)),
              "position_ids": list(range(n))} for n in lengths]
    return Collator(pad_token_id=2)(items)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_shards_put_back_together_are_the_batch_with_shifted_labels(size):
    batch = collated([13, 9])  # (2, 13): not a multiple of 2, 3 or 4
    shards = [SequenceShards(None, rank, size).shard(dict(batch)) for rank in range(size)]
    whole = {name: torch.cat([shard[name] for shard in shards], dim=1) for name in shards[0]}
    padded = -13 % size
    assert whole["input_ids"].shape == (2, 13 + padded)
    assert torch.equal(whole["input_ids"][:, :13], batch["input_ids"])
    assert torch.equal(whole["attention_mask"][:, :13], batch["attention_mask"])
    assert not whole["attention_mask"][:, 13:].any()
    expected = torch.full((2, 13 + padded), -100)
    expected[:, :12] = batch["labels"][:, 1:]  # the next token's label, across shard boundaries
    assert torch.equal(whole["shift_labels"], expected)
    assert torch.equal(whole["position_ids"][0], torch.arange(13 + padded))  # padding counts on
    assert SequenceShards(None, 0, size).length == 0 and all(s["input_ids"].shape[1] == (13 + padded) // size
                                                             for s in shards)


def test_padding_to_a_multiple_keeps_a_divisible_batch():
    batch = collated([8, 8])
    assert all(torch.equal(pad_to_multiple(batch, 4)[k], v) for k, v in batch.items())


# --------------------------------------------------------------------------- checks

@pytest.mark.parametrize("heads,kv_heads,size,text", [
    (4, 2, 3, "does not divide the model's 4 attention heads"),
    (24, 4, 6, "neither divides the other"),
])
def test_heads_that_do_not_split_are_refused(heads, kv_heads, size, text):
    with pytest.raises(SequenceParallelError, match=text):
        check_heads(heads, kv_heads, size)


def test_the_heads_message_lists_the_sizes_that_work():
    with pytest.raises(SequenceParallelError, match="among 1, 2, 4"):
        check_heads(4, 2, 3)


def test_a_world_size_that_n_does_not_divide_is_refused():
    check_world(4, 2)
    with pytest.raises(SequenceParallelError, match="sequence_parallel_size = 2 does not divide the 3 launched"):
        check_world(3, 2)


SP = ["engine.name=\"deepspeed\"", "engine.deepspeed_config=\"launch/deepspeed/zero2_sp.json\""]


@pytest.mark.parametrize("overrides,text", [
    (["engine.sequence_parallel_size=2"], "needs engine.name = \"deepspeed\""),
    (SP + ["engine.sequence_parallel_size=2", "attention.kernel=\"eager\""], "attention.kernel = \"eager\""),
    (SP + ["engine.sequence_parallel_size=3"], "does not divide the model's 4 attention heads"),
    (SP + ["engine.sequence_parallel_size=0"], "engine.sequence_parallel_size = 0 must be a finite number > 0"),
])
def test_bad_sequence_parallel_recipes_are_refused(overrides, text):
    with pytest.raises(RecipeError, match=text.replace("(", r"\(")):
        load_recipe(TINY, overrides)


def test_a_sequence_parallel_recipe_loads():
    recipe = load_recipe(TINY, SP + ["engine.sequence_parallel_size=2", "train.tiled_mlp=true"])
    assert recipe.engine.sequence_parallel_size == 2 and recipe.train.tiled_mlp


def test_a_json_file_that_contradicts_the_recipe_is_refused(tmp_path):
    from harness.backends.deepspeed_engine import DeepSpeedEngine
    from harness.backends.engine import EngineError, StepConfig

    config = tmp_path / "ds.json"
    config.write_text('{"sequence_parallel_size": 4}')
    step_config = StepConfig(1, 1, 1.0, "fp32")
    assert DeepSpeedEngine(str(config), 4).config(step_config)["sequence_parallel_size"] == 4
    with pytest.raises(EngineError, match="sets sequence_parallel_size = 4, the recipe engine.sequence_parallel_size"):
        DeepSpeedEngine(str(config), 2).config(step_config)


# --------------------------------------------------------------------------- the planner

LLAMA7B = "recipes/llama2_7b_8k.toml"
SP_OFFLOAD = ["engine.deepspeed_config=\"launch/deepspeed/zero2_offload.json\""]


def planned(length: int, *overrides: str, cards: int = 1, card: str = "a100-80gb"):
    from harness.memory import plan

    recipe = load_recipe(LLAMA7B, [f"data.max_seq_length={length}", f"position.target_length={length}",
                                   *SP_OFFLOAD, *overrides])
    return plan(recipe, card=card, cards=cards)


def test_sequence_parallelism_gives_each_card_its_share_of_the_tokens():
    one = planned(131072)
    four = planned(131072, "engine.sequence_parallel_size=4", cards=4)
    assert four.part_bytes("checkpointed hidden states") * 4 == one.part_bytes("checkpointed hidden states")
    assert four.part_bytes("attention workspace") * 4 == one.part_bytes("attention workspace")
    assert four.part_bytes("weights (quantized linears)") == one.part_bytes("weights (quantized linears)")
    assert four.part_bytes("Ulysses all-to-all buffers") > 0 == one.part_bytes("Ulysses all-to-all buffers")
    assert four.peak_bytes < one.peak_bytes / 2


def test_zero_partitions_the_optimizer_over_the_cards():
    one, eight = planned(8192), planned(8192, cards=8)
    assert eight.parts[[p.name for p in eight.parts].index("optimizer states")].cpu_bytes * 8 == pytest.approx(
        one.parts[[p.name for p in one.parts].index("optimizer states")].cpu_bytes, rel=1e-6)


def test_kv_heads_are_held_replicated_when_fewer_than_the_ranks():
    from harness.memory import layer_saved_per_token, model_shape, resolve_setup

    def recipe(size: int):
        return load_recipe("recipes/llama3_8b_32k.toml",
                           [*SP_OFFLOAD, "engine.name=\"deepspeed\"", f"engine.sequence_parallel_size={size}"])

    shape = model_shape(recipe(1))  # 32 heads, 8 KV heads
    setups = [resolve_setup(recipe(n), shape, device="cuda", card=None, seq_len=65536, cards=16) for n in (8, 16)]
    blocks = [layer_saved_per_token(setup)["attention block"] for setup in setups]
    assert blocks[1] - blocks[0] == 2 * (16 - 8) * shape.head_dim * setups[0].dtypes.attention  # k and v, 8 more heads


def test_tiled_mlp_lowers_the_mlp_phase():
    plain, tiled = planned(65536), planned(65536, "train.tiled_mlp=true")
    assert tiled.part_bytes("recomputed layer: MLP block (tiled)") < plain.part_bytes("recomputed layer: MLP block") / 3
    assert tiled.part_bytes("backward transients") < plain.part_bytes("backward transients") / 3
    assert tiled.peak_bytes < plain.peak_bytes


def test_the_goals_fit_by_the_planner():
    """LLaMA2-7B LongQLoRA: 128k on one 32 GB V100 (tiled MLP, offloaded activations), 1M on 8 x 80 GB (SP = 8)."""
    single = planned(131072, "train.tiled_mlp=true", "train.offload_activations=true", card="v100-32gb")
    assert single.fits and single.max_seq_len >= 131072
    eight = planned(1048576, "train.tiled_mlp=true", "train.offload_activations=true",
                    "engine.sequence_parallel_size=8", cards=8)
    assert eight.fits and eight.max_seq_len >= 1048576


def test_suggestions_name_tiling_and_sequence_parallelism():
    result = planned(262144, card="v100-32gb", cards=4)
    text = " | ".join(result.suggestions)
    assert "train.tiled_mlp=true" in text and "engine.sequence_parallel_size=" in text and "--num_gpus 4" in text


def test_a_plan_whose_cards_n_does_not_divide_is_refused():
    from harness.memory import PlanError

    with pytest.raises(PlanError, match="does not divide the 2 launched processes.*--gpus 2"):
        planned(65536, "engine.sequence_parallel_size=4", cards=2)


def test_plan_memory_takes_the_number_of_cards(capsys):
    from harness.cli.plan_memory import main

    code = main([LLAMA7B, "data.max_seq_length=262144", "position.target_length=262144", *SP_OFFLOAD,
                 "engine.sequence_parallel_size=8", "--gpu", "a100-80gb", "--gpus", "8", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["cards"] == 8 and result["sequence_parallel_size"] == 8 and result["fits"]
    assert main([LLAMA7B, "engine.sequence_parallel_size=8", *SP_OFFLOAD, "--gpu", "a100-80gb"]) == 2
    assert "does not divide the 1 launched processes" in capsys.readouterr().err


def test_zero3_reduce_scatter_averages_the_group_so_the_loss_scales_its_gradients(tmp_path):
    """ZeRO-1/2 sum a sequence-parallel group's gradients (scale 1); ZeRO-3's reduce-scatter divides by
    every rank, SP ranks included (scale N); ZeRO-3 without reduce_scatter mixes both and is refused."""
    from harness.backends.deepspeed_engine import DeepSpeedEngine
    from harness.backends.engine import EngineError

    def scale(zero: dict) -> int:
        return DeepSpeedEngine("unused.json", 4)._sequence_gradient_scale({"zero_optimization": zero})

    assert scale({"stage": 2}) == 1 and scale({"stage": 3}) == 4
    with pytest.raises(EngineError, match="reduce_scatter = false"):
        scale({"stage": 3, "reduce_scatter": False})


def test_a_group_sum_has_the_groups_value_and_the_scaled_local_gradient():
    import torch.distributed as dist

    assert not dist.is_initialized()
    group = dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29661", rank=0, world_size=1)
    try:
        value = torch.tensor(3.0, requires_grad=True)
        total = SequenceShards(group, 0, 1, gradient_scale=4).sum(value)
        total.backward()
    finally:
        dist.destroy_process_group()  # later tests start without a process group
    assert float(total) == 3.0 and float(value.grad) == 4.0
