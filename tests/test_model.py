"""Model assembly on the tiny recipe: NF4 fidelity, trainable parameters (rope: tests/backends/test_position.py)."""
from __future__ import annotations

import pytest
import torch

from harness.model import build_model, parameter_counts
from tests.conftest import dequantized_copy, is_4bit, tiny_recipe

pytestmark = pytest.mark.usefixtures("session_cache")


def nf4_levels() -> torch.Tensor:
    """NF4's 16 values (Dettmers et al. 2023, QLoRA appendix E): N(0, 1) quantiles for 8 positive and
    7 negative levels, plus an exact 0, normalised into [-1, 1]."""
    offset = 0.5 * (1 / 32 + 1 / 30)
    positive = -torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return levels / levels.abs().max()


def test_nf4_model_computes_with_its_dequantized_weights():
    """The 4-bit model's logits are those of an fp32 model built from its dequantized weights.
    Train mode: in eval mode without gradients bitsandbytes repacks the weights for its CPU kernel,
    which on CPUs with AVX512-BF16 computes in bf16 (logits then differ by ~3e-3)."""
    ids = torch.randint(3, 260, (2, 96), generator=torch.Generator().manual_seed(0))
    nf4 = build_model(tiny_recipe("attention.name=\"full\""), training=False, with_adapter=False).model
    assert sum(map(is_4bit, nf4.modules())) == 14  # 7 projections x 2 layers; lm_head stays fp32
    plain = dequantized_copy(nf4)
    with torch.no_grad():
        quantized, expected = nf4.train()(input_ids=ids).logits, plain(input_ids=ids).logits
    torch.testing.assert_close(quantized, expected, atol=1e-5, rtol=1e-5)


def test_nf4_weights_are_the_blockwise_nf4_rounding_of_the_fp32_weights():
    """Each Linear4bit weight dequantizes to round-to-nearest NF4 of the original fp32 weight in
    blocks of 64: w / absmax(block) -> the nearest NF4 level, times the block's stored absmax. With
    double quantization the absmax is itself 8-bit quantized (blocks of 256): within 1% (0.55%
    measured). 30% weight noise, FP4, another block size or other source weights would all fail."""
    full = build_model(tiny_recipe("quantization.name=\"none\"", "attention.name=\"full\""), training=False,
                       with_adapter=False).model
    nf4 = build_model(tiny_recipe("attention.name=\"full\""), training=False, with_adapter=False).model
    levels, originals = nf4_levels(), dict(full.named_modules())
    plain = dict(dequantized_copy(nf4).named_modules())
    checked = 0
    for name, module in nf4.named_modules():
        if not is_4bit(module):
            continue
        weight = originals[name].weight.detach().double().reshape(-1, 64)
        dequantized = plain[name].weight.detach().double().reshape(-1, 64)
        absmax = weight.abs().amax(dim=1, keepdim=True)
        stored_absmax = dequantized.abs().amax(dim=1, keepdim=True)  # the absmax element maps to +-1
        torch.testing.assert_close(stored_absmax, absmax, rtol=0.01, atol=0)
        nearest = ((weight / absmax)[..., None] - levels).abs().argmin(dim=-1)
        torch.testing.assert_close(dequantized, levels[nearest] * stored_absmax, rtol=1e-6, atol=0)
        checked += 1
    assert checked == 14


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_only_lora_weights_are_trainable():
    names = trainable_names(build_model(tiny_recipe("attention.name=\"full\"")).model)
    linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    expected = {f"base_model.model.model.layers.{layer}.{block}.{proj}.lora_{ab}.default.weight"
                for layer in range(2) for proj in linear for ab in "AB"
                for block in (["self_attn"] if proj in {"q_proj", "k_proj", "v_proj", "o_proj"} else ["mlp"])}
    assert names == expected


def test_embeddings_and_norms_become_trainable_when_asked():
    names = trainable_names(build_model(tiny_recipe("attention.name=\"full\"", "adapter.trainable_embeddings=true",
                                             "adapter.trainable_norms=true")).model)
    extra = {n for n in names if "lora_" not in n}
    assert extra == {
        "base_model.model.model.embed_tokens.modules_to_save.default.weight",
        "base_model.model.model.norm.modules_to_save.default.weight",
        *{f"base_model.model.model.layers.{i}.{norm}.modules_to_save.default.weight"
          for i in range(2) for norm in ("input_layernorm", "post_attention_layernorm")},
    }
    assert not any("lm_head" in n for n in names)


def test_full_finetuning_trains_everything():
    model = build_model(tiny_recipe("quantization.name=\"none\"", "adapter.name=\"none\"",
                                    "attention.name=\"full\"")).model
    counts = parameter_counts(model)
    assert sum(r["trainable"] for r in counts.values()) == sum(r["total"] for r in counts.values())


def test_gradient_checkpointing_switch():
    on = build_model(tiny_recipe("attention.name=\"full\"")).model
    off = build_model(tiny_recipe("attention.name=\"full\"", "train.gradient_checkpointing=false")).model
    assert on.base_model.model.is_gradient_checkpointing
    assert not off.base_model.model.is_gradient_checkpointing


def test_summary_counts_packed_4bit_storage(capsys):
    from rich.console import Console

    build_model(tiny_recipe("attention.name=\"full\""), console=Console(width=120))
    out = capsys.readouterr().out
    assert "uint8" in out and "trainable" in out and "Estimated memory" in out


@pytest.mark.parametrize("upcast, stream", [(False, torch.bfloat16), (True, torch.float32)])
def test_frozen_weights_set_the_residual_stream_dtype(upcast, stream):
    """QLoRA with 16-bit weights: by default the embeddings, norms and head keep model.dtype, so the
    hidden states that checkpointing saves (each layer's input) are 16-bit; train.fp32_frozen_weights
    restores peft's fp32 cast, and with it an fp32 stream. LoRA weights are fp32 either way."""
    recipe = tiny_recipe("attention.name=\"full\"", "model.dtype=\"bf16\"", "quantization.compute_dtype=\"bf16\"",
                  f"train.fp32_frozen_weights={str(upcast).lower()}")
    model = build_model(recipe).model
    inner = model.base_model.model.model
    layer_inputs = []

    def record_input(module, args, kwargs):
        layer_inputs.append(args[0] if args else kwargs["hidden_states"])

    inner.layers[1].register_forward_pre_hook(record_input, with_kwargs=True)
    model(input_ids=torch.randint(3, 260, (1, 16)))
    assert inner.embed_tokens.weight.dtype == inner.norm.weight.dtype == stream
    assert layer_inputs[0].dtype == stream
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_trainable_embeddings_and_norms_train_in_fp32_over_16_bit_weights():
    recipe = tiny_recipe("attention.name=\"full\"", "model.dtype=\"bf16\"", "quantization.compute_dtype=\"bf16\"",
                  "adapter.trainable_embeddings=true", "adapter.trainable_norms=true")
    model = build_model(recipe).model
    trainable = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens.modules_to_save" in name for name in trainable)
    assert set(trainable.values()) == {torch.float32}
