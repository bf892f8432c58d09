"""Position backends: how RoPE is stretched from the original context to the target.

Each backend edits a transformers config *before the weights load*:
`config.rope_parameters` gets the rope type and its settings (rope_theta is kept), and
`config.max_position_embeddings` becomes the target length. A model whose own rope type is
not "default" (LLaMA 3's "llama3", say) is only overwritten with `override_native = true`.

    linear   Position Interpolation (Chen et al. 2023): position p is read as p / factor.
    dynamic  NTK-aware scaling that grows rope_theta with the sequence length.
    yarn     YaRN: per-frequency interpolation with attention temperature.
    llama3   LLaMA 3.1's frequency-banded scaling.
    none     leave the positions alone.
"""
from __future__ import annotations

import math

from harness.registry import register
from harness.errors import HarnessError


class PositionError(HarnessError, ValueError):
    pass


def original_context_of(config, original_context: int = 0) -> int:
    """The pretraining window: given, or read from the config before it is changed."""
    rope = getattr(config, "rope_parameters", None) or {}
    return int(original_context or rope.get("original_max_position_embeddings") or config.max_position_embeddings)


def interpolation_factor(target_length: int, original: int, factor: float = 0.0) -> float:
    """The paper's factor: ceil(target / original) unless given explicitly."""
    if factor:
        return float(factor)
    if target_length <= 0:
        raise PositionError("position: give target_length or factor")
    return float(math.ceil(target_length / original))


def _set_rope(config, rope_type: str, target_length: int, override_native: bool, **settings) -> None:
    current = dict(getattr(config, "rope_parameters", None) or {})
    native = current.get("rope_type", "default")
    if native not in ("default", rope_type) and not override_native:
        raise PositionError(
            f"the model already uses rope_type {native!r}; position.name = {rope_type!r} would replace it. "
            f"Set position.override_native = true to do so, or position.name = \"none\" to keep it"
        )
    theta = current.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    config.rope_parameters = {"rope_type": rope_type, "rope_theta": theta, **settings}
    # target_length 0 (zero-shot evaluation with only a factor): the window grows by the factor.
    config.max_position_embeddings = target_length or int(config.max_position_embeddings * settings["factor"])


@register("position", "linear", description="Position Interpolation: positions scaled by 1/factor (the paper)")
def linear_position(config, *, target_length: int, factor: float = 0.0, original_context: int = 0,
                    override_native: bool = False) -> float:
    original = original_context_of(config, original_context)
    factor = interpolation_factor(target_length, original, factor)
    _set_rope(config, "linear", target_length, override_native, factor=factor)
    return factor


@register("position", "dynamic", description="Dynamic NTK scaling: rope_theta grows past the original window")
def dynamic_position(config, *, target_length: int, factor: float = 0.0, original_context: int = 0,
                     override_native: bool = False) -> float:
    original = original_context_of(config, original_context)
    factor = interpolation_factor(target_length, original, factor)
    _set_rope(config, "dynamic", target_length, override_native, factor=factor)
    # transformers' dynamic NTK reads max_position_embeddings as the *pretraining* window:
    # keep it there, or the scaling would only start past the target.
    config.max_position_embeddings = original
    return factor


@register("position", "yarn", description="YaRN: per-frequency interpolation with attention temperature")
def yarn_position(config, *, target_length: int, factor: float = 0.0, original_context: int = 0,
                  override_native: bool = False, beta_fast: float = 32.0, beta_slow: float = 1.0) -> float:
    original = original_context_of(config, original_context)
    factor = interpolation_factor(target_length, original, factor)
    _set_rope(config, "yarn", target_length, override_native, factor=factor,
              original_max_position_embeddings=original, beta_fast=beta_fast, beta_slow=beta_slow)
    return factor


@register("position", "llama3", description="LLaMA 3.1 frequency-banded scaling")
def llama3_position(config, *, target_length: int, factor: float = 0.0, original_context: int = 0,
                    override_native: bool = False, low_freq_factor: float = 1.0,
                    high_freq_factor: float = 4.0) -> float:
    original = original_context_of(config, original_context)
    factor = interpolation_factor(target_length, original, factor)
    _set_rope(config, "llama3", target_length, override_native, factor=factor,
              original_max_position_embeddings=original, low_freq_factor=low_freq_factor,
              high_freq_factor=high_freq_factor)
    return factor


@register("position", "none", description="Keep the model's positions as they are")
def no_position(config, **_ignored) -> float:
    return 1.0
