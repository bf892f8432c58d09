"""Model assembly on the tiny recipe: rope scaling, NF4 fidelity, trainable parameters."""
from __future__ import annotations

import pytest
import torch

from harness.backends.position import PositionError, linear_position
from harness.model import build_model, parameter_counts
from harness.recipe import load_recipe
from tests.conftest import ROOT, tiny_llama_config


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


def test_linear_pi_matches_the_definition():
    built = build_model(tiny("quantization.name=\"none\"", "attention.name=\"full\""), training=False, with_adapter=False)
    config = built.model.config
    assert built.rope_factor == 2.0 and config.rope_parameters["rope_type"] == "linear"
    assert config.rope_parameters["rope_theta"] == 10000.0 and config.max_position_embeddings == 512
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


@pytest.mark.parametrize("name", ["dynamic", "yarn", "llama3"])
def test_other_position_backends_match_transformers_rope_init(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from harness import registry

    config = tiny_llama_config(max_position_embeddings=256)
    factor = registry.get("position", name).fn(config, target_length=1024)
    assert factor == 4.0 and config.rope_parameters["rope_type"] == name
    assert config.rope_parameters["rope_theta"] == 10000.0
    inv_freq, _ = ROPE_INIT_FUNCTIONS[name](config, "cpu")
    default = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    assert inv_freq.shape == default.shape
    if name != "dynamic":  # dynamic NTK only rescales at run time, past the original window
        assert not torch.allclose(inv_freq, default)


def test_native_rope_type_is_not_overwritten_silently():
    config = tiny_llama_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192})
    with pytest.raises(PositionError, match="override_native = true"):
        linear_position(config, target_length=4096, original_context=1024)
    linear_position(config, target_length=4096, original_context=1024, override_native=True)
    assert config.rope_parameters == {"rope_type": "linear", "rope_theta": 5e5, "factor": 4.0}


def test_nf4_logits_stay_close_to_fp32():
    ids = torch.randint(3, 260, (2, 96), generator=torch.Generator().manual_seed(0))
    common = ("attention.name=\"full\"",)
    full = build_model(tiny("quantization.name=\"none\"", *common), training=False, with_adapter=False).model
    nf4 = build_model(tiny(*common), training=False, with_adapter=False).model
    assert any("Linear4bit" in type(m).__name__ for m in nf4.modules())
    with torch.no_grad():
        reference, quantized = full(input_ids=ids).logits, nf4(input_ids=ids).logits
    # NF4 (+ double quantization) keeps the logits within 10% relative RMS error on this model,
    # and the output distributions close (KL well under 0.05 nats).
    relative = (quantized - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()
    kl = torch.nn.functional.kl_div(quantized.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean")
    assert relative < 0.10, relative
    assert kl / ids.shape[1] < 0.05, kl


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
