"""Position backends: how RoPE is stretched from the original context to the target.

Each backend edits a transformers config *before the weights load*:
`config.rope_parameters` gets the rope type and its settings (rope_theta and
partial_rotary_factor, what RoPE is before any stretching, are kept), and
`config.max_position_embeddings` becomes the target length. A model whose own rope type is
not "default" (LLaMA 3's "llama3", say) is only overwritten with `override_native = true`.

Families:
    per-layer-type rope  (Gemma 3: one table for full_attention, one for sliding_attention)
                         only the tables of layers that see the whole sequence are stretched: a
                         sliding layer never sees a distance past its window, inside the original
                         context (Gemma 3 scales its global layers alone in the same way).
    longrope only        (Phi-3: Phi3Config accepts rope types "default" and "longrope" alone)
                         the stretch is written in longrope's form, per-frequency divisors and an
                         attention factor, which expresses PI, YaRN and llama3 exactly; dynamic NTK
                         depends on the sequence length and is refused.

    linear   Position Interpolation (Chen et al. 2023): position p is read as p / factor.
    dynamic  NTK-aware scaling that grows rope_theta with the sequence length.
    yarn     YaRN: per-frequency interpolation with attention temperature.
    llama3   LLaMA 3.1's frequency-banded scaling.
    none     leave the positions alone.
"""
from __future__ import annotations

import torch

from harness import policy
from harness.errors import HarnessError
from harness.recipe import original_window
from harness.registry import register


class PositionError(HarnessError, ValueError):
    pass


BASE_KEYS = ("rope_theta", "partial_rotary_factor")  # RoPE itself, kept under every stretch
LONGROPE_ONLY = ("phi3",)  # model types whose config class accepts no other scaled rope type


def original_context_of(config, original_context: int = 0) -> int:
    """The pretraining window: given (model.original_context), or as the config records it before it is
    changed (harness.recipe.original_window)."""
    return int(original_context or original_window(config))


def _window_and_factor(config, target_length: int, factor: float, original_context: int) -> tuple[int, float]:
    """(the model's original window, the rope factor harness.policy.interpolation_factor gives); a
    position backend needs a target length or a factor."""
    if not factor and target_length <= 0:
        raise PositionError("position: give target_length or factor")
    original = original_context_of(config, original_context)
    return original, policy.interpolation_factor(target_length, original, factor)


def _rope_tables(config) -> dict[str | None, dict]:
    """The rope tables a backend stretches: {None: rope_parameters} for one table, or {layer type:
    table} of the per-layer-type tables (Gemma 3) of every layer type but the sliding ones."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    nested = [key for key in params if key in (getattr(config, "layer_types", None) or ())]
    if not nested:
        return {None: params}
    return {key: dict(params[key]) for key in nested if params[key] is not None and not key.startswith("sliding")}


def _set_rope(config, rope_type: str, target_length: int, override_native: bool, **settings) -> None:
    tables = {key: _stretched(config, table, rope_type, override_native, settings)
              for key, table in _rope_tables(config).items()}
    config.rope_parameters = tables[None] if None in tables else {**config.rope_parameters, **tables}
    if config.model_type in LONGROPE_ONLY:
        _as_longrope(config)
    # target_length 0 (zero-shot evaluation with only a factor): the window grows by the factor.
    config.max_position_embeddings = target_length or int(config.max_position_embeddings * settings["factor"])


def _stretched(config, table: dict, rope_type: str, override_native: bool, settings: dict) -> dict:
    native = table.get("rope_type", "default")
    if native not in ("default", rope_type) and not override_native:
        raise PositionError(
            f"the model already uses rope_type {native!r}; position.name = {rope_type!r} would replace it. "
            f"Set position.override_native = true to do so, or position.name = \"none\" to keep it"
        )
    kept = {key: table[key] for key in BASE_KEYS if key in table}
    kept.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return {"rope_type": rope_type, **kept, **settings}


def _as_longrope(config) -> None:
    """The config's stretched rope in longrope's form, for families that accept no other (Phi-3):
    longrope divides each inverse frequency by its factor and scales cos/sin by attention_factor, so
    factor_i = default_i / stretched_i and the stretched type's attention factor give the same rotary."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = config.rope_parameters
    if params["rope_type"] == "dynamic":
        raise PositionError(f"position.name = \"dynamic\" cannot run {config.model_type}: its config accepts only "
                            f"longrope, which has no length-dependent theta. "
                            f"Use position.name = \"yarn\" or \"linear\"")
    original = original_window(config)  # max_position_embeddings is not yet the target here
    config.original_max_position_embeddings = original  # longrope reads the pretraining window from here
    stretched, attention_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config)
    dim = 2 * stretched.numel()
    default = 1.0 / params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    factors = (default / stretched.double()).tolist()
    config.rope_parameters = {
        "rope_type": "longrope", **{key: params[key] for key in BASE_KEYS if key in params},
        "short_factor": factors, "long_factor": factors, "attention_factor": float(attention_factor),
        "original_max_position_embeddings": original, "factor": params["factor"],
    }


@register("position", "linear", description="Position Interpolation: positions scaled by 1/factor (the paper)")
def linear_position(config, *, target_length: int, factor: float = 0.0, original_context: int = 0,
                    override_native: bool = False) -> float:
    _, factor = _window_and_factor(config, target_length, factor, original_context)
    _set_rope(config, "linear", target_length, override_native, factor=factor)
    return factor


@register("position", "dynamic", description="Dynamic NTK scaling: rope_theta grows past the original window")
def dynamic_position(config, *, target_length: int, factor: float = 0.0, original_context: int = 0,
                     override_native: bool = False) -> float:
    original, factor = _window_and_factor(config, target_length, factor, original_context)
    _set_rope(config, "dynamic", target_length, override_native, factor=factor)
    # transformers' dynamic NTK reads max_position_embeddings as the *pretraining* window:
    # keep it there, or the scaling would only start past the target.
    config.max_position_embeddings = original
    return factor


@register("position", "yarn", description="YaRN: per-frequency interpolation with attention temperature")
def yarn_position(config, *, target_length: int, factor: float = 0.0, original_context: int = 0,
                  override_native: bool = False, beta_fast: float = 32.0, beta_slow: float = 1.0) -> float:
    original, factor = _window_and_factor(config, target_length, factor, original_context)
    _set_rope(config, "yarn", target_length, override_native, factor=factor,
              original_max_position_embeddings=original, beta_fast=beta_fast, beta_slow=beta_slow)
    return factor


@register("position", "llama3", description="LLaMA 3.1 frequency-banded scaling")
def llama3_position(config, *, target_length: int, factor: float = 0.0, original_context: int = 0,
                    override_native: bool = False, low_freq_factor: float = 1.0,
                    high_freq_factor: float = 4.0) -> float:
    original, factor = _window_and_factor(config, target_length, factor, original_context)
    _set_rope(config, "llama3", target_length, override_native, factor=factor,
              original_max_position_embeddings=original, low_freq_factor=low_freq_factor,
              high_freq_factor=high_freq_factor)
    return factor


@register("position", "none", description="Keep the model's positions as they are")
def no_position(config, **_ignored) -> float:
    return 1.0
