"""Model assembly on the tiny recipe: rope scaling, NF4 fidelity, trainable parameters."""
from __future__ import annotations

import math

import pytest
import torch

from harness.backends.position import PositionError, linear_position
from harness.model import build_model, parameter_counts
from harness.recipe import load_recipe
from tests.conftest import ROOT, dequantized_copy, is_4bit, tiny_llama_config


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path_factory.getbasetemp() / "harness-cache"))
    monkeypatch.chdir(ROOT)


def tiny(*overrides):
    return load_recipe("recipes/tiny_cpu.toml", list(overrides))


def reference_linear_rope(positions, head_dim, theta, factor):
    """cos/sin of linear PI written out from its definition: angle = (p / factor) * theta^(-2i/d)."""
    inv_freq = [theta ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    angles = torch.tensor([[p / factor * f for f in inv_freq] for p in positions], dtype=torch.float64)
    angles = torch.cat([angles, angles], dim=-1)  # LLaMA's rotate_half layout
    return angles.cos(), angles.sin()


def default_inv_freq(head_dim, theta):
    """RoPE's frequencies theta^(-2i/d), i < d/2 (Su et al. 2021), in float64."""
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def test_linear_pi_matches_the_definition():
    built = build_model(tiny("quantization.name=\"none\"", "attention.name=\"full\""), training=False, with_adapter=False)
    config = built.model.config
    assert built.rope_factor == 2.0
    assert config.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    assert config.max_position_embeddings == 512
    # PI reads position p as p / factor; (p / s) * theta_i = p * (theta_i / s), which is how
    # transformers stores it: every frequency divided by the factor.
    torch.testing.assert_close(built.model.model.rotary_emb.inv_freq.double(), default_inv_freq(16, 10000.0) / 2.0,
                               atol=0, rtol=1e-6)
    positions = [0, 1, 7, 255, 300, 511]
    x = torch.zeros(1, len(positions), config.hidden_size)
    cos, sin = built.model.model.rotary_emb(x, torch.tensor([positions]))
    ref_cos, ref_sin = reference_linear_rope(positions, config.hidden_size // config.num_attention_heads, 10000.0, 2.0)
    torch.testing.assert_close(cos[0].double(), ref_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin[0].double(), ref_sin, atol=1e-5, rtol=0)


def test_factor_defaults_to_ceil_and_can_be_explicit():
    config = tiny_llama_config(max_position_embeddings=4096)
    assert linear_position(config, target_length=12000) == 3.0  # ceil(12000 / 4096)
    config = tiny_llama_config(max_position_embeddings=4096)
    assert linear_position(config, target_length=12000, factor=2.5) == 2.5


# Each backend on the tiny recipe (window L0 = 256, target 512, so factor 2; head_dim 16, theta 1e4):
# what it writes into the config, and the frequencies the built model then rotates by. The
# formulas below are written from the papers and reference code, not read from transformers.
L0, HEAD_DIM, THETA, FACTOR = 256, 16, 10000.0, 2.0
OTHER_ROPE = {
    "dynamic": ({"rope_type": "dynamic", "rope_theta": THETA, "factor": FACTOR}, L0),  # NTK reads L0 as the window
    "yarn": ({"rope_type": "yarn", "rope_theta": THETA, "factor": FACTOR, "original_max_position_embeddings": L0,
              "beta_fast": 32.0, "beta_slow": 1.0}, 512),
    "llama3": ({"rope_type": "llama3", "rope_theta": THETA, "factor": FACTOR, "original_max_position_embeddings": L0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 512),
}


def dynamic_ntk_inv_freq(seq_len):
    """Dynamic NTK (bloc97; transformers' "dynamic"): past L0 the base grows to
    theta * (factor * L / L0 - (factor - 1)) ** (d / (d - 2)); within L0 it is theta."""
    if seq_len <= L0:
        return default_inv_freq(HEAD_DIM, THETA)
    base = THETA * (FACTOR * seq_len / L0 - (FACTOR - 1)) ** (HEAD_DIM / (HEAD_DIM - 2))
    return default_inv_freq(HEAD_DIM, base)


def yarn_inv_freq_and_scale(beta_fast=32.0, beta_slow=1.0):
    """YaRN (Peng et al. 2023, reference code): dimensions that turn more than beta_fast times over L0
    keep their frequency, fewer than beta_slow times are divided by the factor, a linear ramp over the
    dimension index in between (bounds floored / ceiled); cos and sin scale by 0.1 ln(factor) + 1."""
    def dim_of(rotations):  # the (fractional) dimension index that turns `rotations` times over L0
        return HEAD_DIM * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(THETA))

    low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), HEAD_DIM - 1)
    freq = default_inv_freq(HEAD_DIM, THETA)
    ramp = ((torch.arange(HEAD_DIM // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return freq * (1 - ramp) + freq / FACTOR * ramp, 0.1 * math.log(FACTOR) + 1


def llama3_inv_freq(low_freq_factor=1.0, high_freq_factor=4.0):
    """LLaMA 3.1 (Meta's apply_scaling): wavelengths under L0 / high_freq_factor kept, over
    L0 / low_freq_factor divided by the factor, smoothly interpolated in between."""
    out = []
    for f in default_inv_freq(HEAD_DIM, THETA).tolist():
        wavelen = 2 * math.pi / f
        if wavelen < L0 / high_freq_factor:
            out.append(f)
        elif wavelen > L0 / low_freq_factor:
            out.append(f / FACTOR)
        else:
            smooth = (L0 / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * f / FACTOR + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def assert_rotary(rotary, positions, inv_freq, scale=1.0):
    """The model's rotary embedding at `positions` against cos/sin of p * inv_freq (times scale)."""
    x = torch.zeros(1, len(positions), 64)
    cos, sin = rotary(x, torch.tensor([positions]))
    angles = torch.tensor(positions, dtype=torch.float64)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    torch.testing.assert_close(cos[0].double(), angles.cos() * scale, atol=1e-4, rtol=0)
    torch.testing.assert_close(sin[0].double(), angles.sin() * scale, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(OTHER_ROPE))
def test_other_position_backends_write_the_config_and_rotate_by_the_published_formulas(name):
    built = build_model(tiny("quantization.name=\"none\"", "attention.name=\"full\"", f"position.name=\"{name}\""),
                        training=False, with_adapter=False)
    config, rotary = built.model.config, built.model.model.rotary_emb
    rope_parameters, max_positions = OTHER_ROPE[name]
    assert built.rope_factor == FACTOR and built.original_context == L0
    assert config.rope_parameters == rope_parameters
    assert config.max_position_embeddings == max_positions
    if name == "dynamic":  # frequencies follow the length: theta inside L0, a grown base past it
        assert_rotary(rotary, list(range(200)), dynamic_ntk_inv_freq(200))
        long = list(range(400))  # past L0, within the target: 400 = L0 * 1.56
        assert not torch.allclose(dynamic_ntk_inv_freq(400), dynamic_ntk_inv_freq(200))
        assert_rotary(rotary, long, dynamic_ntk_inv_freq(400))
        torch.testing.assert_close(rotary.inv_freq.double(), dynamic_ntk_inv_freq(400), atol=0, rtol=1e-5)
    elif name == "yarn":
        inv_freq, scale = yarn_inv_freq_and_scale()
        torch.testing.assert_close(rotary.inv_freq.double(), inv_freq, atol=0, rtol=1e-6)
        assert rotary.attention_scaling == pytest.approx(scale)
        assert_rotary(rotary, [0, 1, 7, 255, 300, 511], inv_freq, scale)
    else:
        torch.testing.assert_close(rotary.inv_freq.double(), llama3_inv_freq(), atol=0, rtol=1e-6)
        assert_rotary(rotary, [0, 1, 7, 255, 300, 511], llama3_inv_freq())


def test_the_formulas_cover_every_band():
    """The checks above are only as strong as the cases: at these sizes each formula keeps some
    frequencies, divides some by the factor and blends others."""
    freq = default_inv_freq(HEAD_DIM, THETA)
    for scaled in (yarn_inv_freq_and_scale()[0], llama3_inv_freq()):
        ratio = (freq / scaled).tolist()
        assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(FACTOR)
        assert any(1.01 < r < FACTOR - 0.01 for r in ratio), ratio


def test_native_rope_type_is_not_overwritten_silently():
    config = tiny_llama_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192})
    with pytest.raises(PositionError, match="override_native = true"):
        linear_position(config, target_length=4096, original_context=1024)
    linear_position(config, target_length=4096, original_context=1024, override_native=True)
    assert config.rope_parameters == {"rope_type": "linear", "rope_theta": 5e5, "factor": 4.0}


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
    nf4 = build_model(tiny("attention.name=\"full\""), training=False, with_adapter=False).model
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
    full = build_model(tiny("quantization.name=\"none\"", "attention.name=\"full\""), training=False,
                       with_adapter=False).model
    nf4 = build_model(tiny("attention.name=\"full\""), training=False, with_adapter=False).model
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
    names = trainable_names(build_model(tiny("attention.name=\"full\"")).model)
    linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    expected = {f"base_model.model.model.layers.{layer}.{block}.{proj}.lora_{ab}.default.weight"
                for layer in range(2) for proj in linear for ab in "AB"
                for block in (["self_attn"] if proj in {"q_proj", "k_proj", "v_proj", "o_proj"} else ["mlp"])}
    assert names == expected


def test_embeddings_and_norms_become_trainable_when_asked():
    names = trainable_names(build_model(tiny("attention.name=\"full\"", "adapter.trainable_embeddings=true",
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
    model = build_model(tiny("quantization.name=\"none\"", "adapter.name=\"none\"", "attention.name=\"full\"")).model
    counts = parameter_counts(model)
    assert sum(r["trainable"] for r in counts.values()) == sum(r["total"] for r in counts.values())


def test_gradient_checkpointing_switch():
    on = build_model(tiny("attention.name=\"full\"")).model
    off = build_model(tiny("attention.name=\"full\"", "train.gradient_checkpointing=false")).model
    assert on.base_model.model.is_gradient_checkpointing
    assert not off.base_model.model.is_gradient_checkpointing


def test_summary_counts_packed_4bit_storage(capsys):
    from rich.console import Console

    build_model(tiny("attention.name=\"full\""), console=Console(width=120))
    out = capsys.readouterr().out
    assert "uint8" in out and "trainable" in out and "Estimated memory" in out


@pytest.mark.parametrize("upcast, stream", [(False, torch.bfloat16), (True, torch.float32)])
def test_frozen_weights_set_the_residual_stream_dtype(upcast, stream):
    """QLoRA with 16-bit weights: by default the embeddings, norms and head keep model.dtype, so the
    hidden states that checkpointing saves (each layer's input) are 16-bit; train.fp32_frozen_weights
    restores peft's fp32 cast, and with it an fp32 stream. LoRA weights are fp32 either way."""
    recipe = tiny("attention.name=\"full\"", "model.dtype=\"bf16\"", "quantization.compute_dtype=\"bf16\"",
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
    recipe = tiny("attention.name=\"full\"", "model.dtype=\"bf16\"", "quantization.compute_dtype=\"bf16\"",
                  "adapter.trainable_embeddings=true", "adapter.trainable_norms=true")
    model = build_model(recipe).model
    trainable = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens.modules_to_save" in name for name in trainable)
    assert set(trainable.values()) == {torch.float32}
