"""Position backends (harness.backends.position): each rope stretch against its published formula.

On the tiny recipe (LLaMA, a 256-token window stretched to 512) and, over their native ropes, on
every family of tests/test_families.py; the rope factor that the recipe and the backends share is
harness.policy.interpolation_factor.
"""
from __future__ import annotations

import math

import pytest
import torch

from harness import policy
from harness.backends.position import PositionError, linear_position
from harness.model import build_model
from tests.conftest import tiny_llama_config, tiny_recipe
from tests.test_families import FAMILIES, NAMES, family

pytestmark = pytest.mark.usefixtures("session_cache")


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
    recipe = tiny_recipe("position.name=\"linear\"", "quantization.name=\"none\"", "attention.name=\"full\"")
    built = build_model(recipe, training=False, with_adapter=False)
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


def yarn_reference(dim, theta, factor, original, beta_fast=32.0, beta_slow=1.0):
    """YaRN (Peng et al. 2023): frequencies that turn fewer than beta_slow times over the original window
    are divided by the factor, those past beta_fast kept, a linear ramp between (over whole dimensions);
    attention temperature 0.1 ln(s) + 1."""
    def dimension(rotations):  # the dimension index whose wavelength fits `rotations` times in the window
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(dimension(beta_fast)), 0), min(math.ceil(dimension(beta_slow)), dim - 1)
    interpolated = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    freq = default_inv_freq(dim, theta)
    return freq * (1 - interpolated) + freq / factor * interpolated, 0.1 * math.log(factor) + 1


def yarn_inv_freq_and_scale():
    """yarn_reference on the tiny recipe."""
    return yarn_reference(HEAD_DIM, THETA, FACTOR, L0)


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
    built = build_model(tiny_recipe("quantization.name=\"none\"", "attention.name=\"full\"",
                                    f"position.name=\"{name}\""), training=False, with_adapter=False)
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


def rotary(model):
    """(inv_freq, attention scaling) of the layers that see the whole sequence."""
    embedding = model.model.rotary_emb
    if hasattr(embedding, "full_attention_inv_freq"):  # Gemma-3: one table per layer type
        return embedding.full_attention_inv_freq, embedding.full_attention_attention_scaling
    return embedding.inv_freq, embedding.attention_scaling


@pytest.mark.parametrize("backend", ["linear", "yarn"])
@pytest.mark.parametrize("name", NAMES)
def test_position_backends_replace_the_native_rope_only_when_asked(name, backend, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness.backends.position import PositionError, linear_position, yarn_position
    from harness.base_model import config_from_dict

    stretch = {"linear": linear_position, "yarn": yarn_position}[backend]
    init = {**family(FAMILIES[name]).model.init_config}
    rope = init["rope_parameters"].get("full_attention", init["rope_parameters"])
    if rope["rope_type"] != backend:  # yarn over a yarn base replaces only its settings
        with pytest.raises(PositionError, match="already uses rope_type .*position.override_native = true"):
            stretch(config_from_dict(init), target_length=1024, original_context=256)
    config = config_from_dict(init)
    assert stretch(config, target_length=1024, original_context=256, override_native=True) == 4.0
    model = AutoModelForCausalLM.from_config(config)
    theta = 1e6 if name in ("mistral", "qwen2", "qwen3", "gemma3_text") else 5e5 if name == "llama3" else 1e4
    dim = model.model.layers[0].self_attn.head_dim
    expected = (default_inv_freq(dim, theta) / 4, 1.0) if backend == "linear" else yarn_reference(dim, theta, 4.0, 256)
    inv_freq, scaling = rotary(model)
    torch.testing.assert_close(inv_freq.double(), expected[0], rtol=1e-6, atol=0)
    assert scaling == pytest.approx(expected[1], rel=1e-6)
    if name == "gemma3_text":  # sliding layers see at most 64 tokens back: their rope is left alone
        torch.testing.assert_close(model.model.rotary_emb.sliding_attention_inv_freq.double(),
                                   default_inv_freq(dim, 1e4), rtol=1e-6, atol=0)
    model.save_pretrained(tmp_path)  # Phi-3 takes longrope alone: the stretch is written in its form
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).max_position_embeddings == 1024
    torch.testing.assert_close(rotary(reloaded)[0], inv_freq, rtol=0, atol=0)


def test_dynamic_ntk_is_refused_where_only_longrope_is_accepted():
    from harness.backends.position import PositionError, dynamic_position
    from harness.base_model import config_from_dict

    config = config_from_dict({**family(FAMILIES["phi3"]).model.init_config})
    with pytest.raises(PositionError, match="dynamic.*cannot run phi3.*longrope"):
        dynamic_position(config, target_length=1024, original_context=256, override_native=True)


def test_the_factor_is_ceil_of_target_over_window_or_the_given_one():
    assert [policy.interpolation_factor(t, 4096) for t in (4096, 4097, 8192, 12000, 12288)] == [1.0, 2.0, 2.0, 3.0, 3.0]
    assert policy.interpolation_factor(12000, 4096, factor=2.5) == 2.5
    assert policy.interpolation_factor(0, 4096) == 0.0 and policy.interpolation_factor(8192, 0) == 0.0  # not known
    with pytest.raises(PositionError, match="give target_length or factor"):
        linear_position(tiny_llama_config(max_position_embeddings=4096), target_length=0)


NATIVE_LLAMA3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 4.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 128}


@pytest.mark.parametrize("name", NAMES)
def test_the_recipe_and_the_position_backends_read_the_same_original_window(name):
    """The recipe at load reads a local config's dict, the backends the config transformers builds from it:
    one reading (harness.recipe.original_window), the same window, per-layer-type ropes included."""
    from harness.backends.position import original_context_of
    from harness.base_model import config_from_dict
    from harness.recipe import original_window

    init = family(FAMILIES[name]).model.init_config
    rope = init.get("rope_parameters") or {}
    native = rope.get("full_attention", rope).get("original_max_position_embeddings")  # LLaMA 3's own window
    expected = native or init.get("original_max_position_embeddings") or init["max_position_embeddings"]  # Phi-3's
    assert original_window(init) == original_context_of(config_from_dict(init)) == expected


def test_a_native_ropes_own_window_is_the_original_at_load_in_training_and_in_generation():
    """A base whose rope is already scaled (LLaMA 3.1's): its original_max_position_embeddings, 128 here, not
    max_position_embeddings (512), for the recipe at load, the position backend, and the generate command."""
    from harness.backends.position import original_context_of, yarn_position
    from harness.base_model import config_from_dict
    from harness.generation import context_window

    rope = ", ".join(f"{key} = {value!r}".replace("'", '"') for key, value in NATIVE_LLAMA3.items())
    recipe = tiny_recipe(f"model.init_config.rope_parameters={{{rope}}}",
                         "model.init_config.max_position_embeddings=512", "position.override_native=true")
    config = config_from_dict(recipe.model.init_config)
    assert recipe.resolved.original_context == original_context_of(config) == 128
    assert recipe.resolved.rope_factor == 4.0  # ceil(512 / 128)
    yarn_position(config, target_length=512, override_native=True)
    assert context_window(config).original == 128
