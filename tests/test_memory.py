"""The memory planner: exact static counts, scaling laws, the paper's claims, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.memory import CARDS, PlanError, attention_scores_bytes, model_shape, plan, resolve_setup
from harness.loop_memory import allocator_peak, training_loop
from harness.recipe import load_recipe
from tests.conftest import ROOT, in_repo

PLAN_MEMORY = ROOT / "tools" / "plan_memory.py"
WEIGHT_LINES = ("weights (quantized linears)", "weights (embeddings, norms, head)")
SMOL_SHAPE = ("model.init_config={vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, "
              "num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1024, tie_word_embeddings=true}")


pytestmark = pytest.mark.usefixtures("session_cache")


def recipe(name: str, *overrides: str):
    return load_recipe(f"recipes/{name}.toml", list(overrides))


def at_length(length: int, *overrides: str) -> tuple[str, ...]:
    return (*overrides, f"data.max_seq_length={length}", f"position.target_length={length}")


@pytest.fixture(scope="module")
def built_tiny(cache):
    """The tiny recipe's model as training builds it: NF4 base, fp32 norms/embeddings, LoRA."""
    from harness.model import build_model

    with in_repo(cache):
        return build_model(load_recipe("recipes/tiny_cpu.toml")).model


def stored_bytes(model) -> tuple[int, int]:
    """(frozen parameters + bitsandbytes quantization state, trainable elements), each storage once."""
    seen, frozen, trainable = set(), 0, 0
    for parameter in model.parameters():
        if parameter.requires_grad:
            trainable += parameter.numel()
            continue
        state = getattr(parameter, "quant_state", None)
        tensors = [parameter] + ([state.absmax, state.code, state.state2.absmax, state.state2.code, state.offset]
                                 if state is not None else [])
        for tensor in tensors:
            if tensor.untyped_storage().data_ptr() not in seen:
                seen.add(tensor.untyped_storage().data_ptr())
                frozen += tensor.untyped_storage().nbytes()
    return frozen, trainable


# --------------------------------------------------------------------------- static memory

def test_weight_line_matches_a_built_nf4_model(built_tiny):
    frozen, _ = stored_bytes(built_tiny)
    result = plan(recipe("tiny_cpu"), device="cpu")
    predicted = sum(result.part_bytes(name) for name in WEIGHT_LINES)
    assert predicted == frozen  # every byte: packed codes, absmax, double-quant state, NF4 codes


def test_lora_parameter_count_is_exact(built_tiny):
    _, trainable = stored_bytes(built_tiny)
    result = plan(recipe("tiny_cpu"), device="cpu")
    assert result.trainable_params == trainable
    assert result.part_bytes("LoRA parameters") == 4 * trainable  # fp32 LoRA on the CPU


# --------------------------------------------------------------------------- scaling

def test_activations_grow_linearly_in_the_sequence_length():
    lines = ("checkpointed hidden states", "recomputed layer: attention block", "recomputed layer: MLP block",
             "backward transients", "attention workspace")
    sizes = [plan(recipe("llama2_7b_8k"), seq_len=n) for n in (8192, 16384, 32768)]
    for line in lines:
        small, middle, large = (result.part_bytes(line) for result in sizes)
        assert middle == 2 * small and large == 4 * small, line
    assert sizes[0].peak_bytes < sizes[1].peak_bytes < sizes[2].peak_bytes


def test_s2_math_kernel_saves_no_scores():
    """SDPA's math fallback (here GQA on a V100) materialises scores. Full attention saves (B, H, L, L)
    of them; S2's piecewise SDPA saves none and holds one piece's (one KV head's queries over
    one group, or 1/PIECE_SHARE of the queries) during backward."""
    def scores(name):
        r = load_recipe("recipes/tiny_cpu.toml", list(at_length(4096, SMOL_SHAPE, f'attention.name="{name}"')))
        setup = resolve_setup(r, model_shape(r), device="cuda", card=CARDS["v100-32gb"], seq_len=None)
        assert setup.kernel == "math"
        return attention_scores_bytes(setup), setup

    (s2_saved, s2_backward), setup = scores("s2")
    (full_saved, full_backward), _ = scores("full")
    assert setup.dtypes.attention == 4 and (setup.shape.heads, setup.shape.kv_heads) == (9, 3)
    # a piece: max(9 heads x 4096 / 128, 3 query heads per KV head x 1024 group) = 3072 queries x 1024 keys,
    # three such fp32 tensors in backward (scores, probabilities, their gradient)
    assert (s2_saved, s2_backward) == (0, 3 * 4 * 3072 * 1024) == (0, 37_748_736)
    assert full_saved == 9 * 4096 * 4096 * 4 == 603_979_776  # fp32 probabilities of every head, kept for backward
    assert s2_backward < full_backward / 16


def test_s2_eager_kernel_is_dense():
    """harness.backends.s2's "eager" kernel masks full (L, L) scores: no saving over full eager
    (measured by bench/plan_validation.py); only grouped kernels get the 1/4."""
    def scores(name):
        r = recipe("tiny_cpu", *at_length(2048, f'attention.name="{name}"', 'attention.kernel="eager"'))
        return attention_scores_bytes(resolve_setup(r, model_shape(r), device="cpu", card=None, seq_len=None))

    (s2_saved, s2_backward), (full_saved, full_backward) = scores("s2"), scores("full")
    assert s2_saved >= full_saved and s2_backward == full_backward / 2


def test_offloaded_optimizer_takes_no_gpu_memory():
    """LLaMA-2-13B (d = 5120, I = 13824, 40 layers, 40 heads of 128) with LoRA r = 64 on every projection:
    r x (in + out) per linear, 64 x (4 x (5120 + 5120) + 3 x (5120 + 13824)) = 6,258,688 per layer,
    250,347,520 in 40 layers."""
    assert 40 * 64 * (4 * (5120 + 5120) + 3 * (5120 + 13824)) == 250_347_520
    offloaded = plan(recipe("llama2_13b_12k"))
    assert offloaded.trainable_params == 250_347_520
    assert offloaded.part_bytes("optimizer states") == 0 and offloaded.part_bytes("gradients") == 0
    assert offloaded.cpu_bytes == 4_005_560_320  # 16 bytes per parameter: fp32 master, 2 fp32 moments, fp32 gradient
    on_gpu = plan(recipe("llama2_13b_12k", 'engine.name="accelerate"', 'train.optimizer="adamw"'))
    assert on_gpu.part_bytes("optimizer states") == 2_002_780_160  # 2 fp32 moments: 8 bytes per parameter


def test_offloaded_activations_leave_one_layer_input_on_the_gpu():
    """train.offload_activations (save_on_cpu) moves the N checkpointed (B, L, d) hidden states to
    CPU RAM; the layer in backward brings its own back."""
    kept = plan(recipe("llama2_7b_8k", *at_length(32768)))
    offloaded = plan(recipe("llama2_7b_8k", *at_length(32768), "train.offload_activations=true"))
    held = kept.part_bytes("checkpointed hidden states")
    assert held // (32 * 32768 * 4096) in (2, 4)  # 32 layers x (1, L, d) in a 16- or 32-bit stream
    assert offloaded.part_bytes("checkpointed hidden states") == held // 32
    assert offloaded.peak_bytes == kept.peak_bytes - held + held // 32
    assert offloaded.cpu_bytes == kept.cpu_bytes + held


# --------------------------------------------------------------------------- the paper's claims

def test_llama2_13b_12k_fits_a_v100_32gb():
    result = plan(recipe("llama2_13b_12k"), card="v100-32gb")
    assert result.fits and result.max_seq_len >= 12288


def test_llama2_7b_8k_micro_batch_1_fits_a_v100_32gb():
    result = plan(recipe("llama2_7b_8k", "train.micro_batch_size=1"), card="v100-32gb")
    assert result.fits


def test_7b_at_64k_without_s2_or_chunked_loss_does_not_fit_a_4090():
    r = recipe("llama2_7b_8k", *at_length(65536, 'attention.name="full"', "train.chunked_loss=false"))
    result = plan(r, card="rtx4090-24gb")
    assert not result.fits and result.max_seq_len < 65536
    assert result.suggestions[0].startswith("chunk the loss")


# --------------------------------------------------------------------------- measured

def test_prediction_matches_a_measured_cpu_step():
    """The planner's dynamic part vs torch's CPU allocator peak over two training steps."""
    # the tensor pool keeps freed blocks, which are no tensors: the allocator's live bytes are planned without it
    overrides = list(at_length(1024)) + ["train.grad_accum=1", "train.cpu_cache_mb=0"]
    loop = training_loop(load_recipe("recipes/tiny_cpu.toml", overrides))
    measured = allocator_peak(loop)
    # measured here: 7,609,344 bytes planned vs 7,615,180 measured (-0.08 %); 2 % of margin on top
    assert plan(loop.recipe, device="cpu").dynamic_bytes == pytest.approx(measured, rel=0.02)


# --------------------------------------------------------------------------- model shapes and the CLI

def test_unknown_hub_model_asks_for_a_config(tmp_path):
    r = recipe("llama2_7b_8k", 'model.name_or_path="someone/unknown-model"')
    with pytest.raises(PlanError, match="--config"):
        plan(r)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8}))
    assert plan(r, config=config).shape.hidden == 1024


def test_cli_prints_a_verdict():
    done = subprocess.run([sys.executable, str(PLAN_MEMORY), "recipes/llama2_13b_12k.toml", "--gpu", "v100-32gb"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Verdict: fits on v100-32gb" in done.stdout and "Longest sequence that fits" in done.stdout


def run_cli(capsys, *argv):
    sys.path.insert(0, str(PLAN_MEMORY.parent))
    try:
        from plan_memory import main
    finally:
        sys.path.pop(0)
    code = main(list(argv))
    return code, capsys.readouterr()


def test_cli_json(capsys):
    code, out = run_cli(capsys, "recipes/llama2_7b_8k.toml", "data.max_seq_length=16384", "position.target_length=16384", "--gib", "24", "--json")
    result = json.loads(out.out)
    assert code == 0 and result["seq_len"] == 16384 and result["capacity_bytes"] == 24 * 2**30
    assert sum(line["at_peak"] for line in result["breakdown"]) == result["peak_bytes"]


@pytest.mark.parametrize("argv, message", [
    (["recipes/missing.toml", "--gpu", "v100-32gb"], "recipe file not found"),
    (["recipes/llama2_7b_8k.toml", "--gpu", "v100"], "known cards: v100-32gb, a100-40gb"),
    (["recipes/llama2_7b_8k.toml", "--gib", "lots"], "--gib 'lots' is not a number"),
    (["recipes/llama2_7b_8k.toml", "--gib", "24", "--seq-len", "0"], "--seq-len: '0' must be a positive integer"),
])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out = run_cli(capsys, *argv)
    assert code == 2 and message in out.err and out.err.count("\n") == 1


def test_fp32_frozen_weights_double_the_checkpointed_hidden_states():
    """As measured on an H100 (bench/results/memory_gpu.json): LLaMA2-7B at 32k without ZeRO fits
    32 GiB with a 16-bit residual stream (21.5 GiB measured), not with peft's fp32 cast (OOM)."""
    def hidden_states(*extra):
        r = recipe("llama2_7b_8k", *at_length(32768), 'engine.name="accelerate"', "train.micro_batch_size=1", *extra)
        result = plan(r, gpu_gib=32)
        return result, next(p.bytes for p in result.parts if p.name == "checkpointed hidden states")

    (bf16, bf16_states), (fp32, fp32_states) = hidden_states(), hidden_states("train.fp32_frozen_weights=true")
    assert bf16_states == 32 * 32768 * 4096 * 2 and fp32_states == 2 * bf16_states
    assert bf16.fits and not fp32.fits
