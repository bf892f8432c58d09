"""Memory rules: what a backend costs, by kind and name, so that any registered backend can be planned.

    register_memory_rule("attention", "s2", AttentionRule(group_size=...))
    rule_for("attention", recipe.attention.name)        # -> AttentionRule, or a PlanError

One rule type per kind of backend that changes memory:

    quantization  QuantizationRule: bytes of one stored linear weight; whether it is quantized
    attention     AttentionRule: the S2 group size G at a length (0: full causal attention)
    adapter       AdapterRule: what trains (LoRA targets, rank, dropout, trained embeddings and
                  norms; rank 0: every weight trains)
    engine        EngineRule: whether the forward autocasts, and the ZeRO settings (None: no DeepSpeed)

Position backends have no rule: they change RoPE's frequencies, not the memory the plan counts.
The built-in backends' rules are at the end of this file. A package that adds a backend through
the `harness.backends` entry point registers its rule in the same module; the planner loads the
entry points before it refuses a name it has no rule for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from harness import policy, registry
from harness.backends import accelerate_engine, deepspeed_engine
from harness.recipe import AdapterConfig, AttentionConfig, Recipe, find_relative

from .shapes import ALL_LINEAR, PlanError, read_json


@dataclass(frozen=True)
class QuantizationRule:
    """How a quantization backend stores the frozen linear weights."""

    # (elements, quantization.double_quant, bytes of an unquantized element) -> bytes of one stored
    # linear weight with its quantization state
    stored_bytes: Callable[[int, bool, int], int]
    # (quantization.double_quant, bytes of an unquantized element) -> the weights line's note
    label: Callable[[bool, int], str]
    # stored in a non-float format: peft's k-bit preparation may cast the rest to fp32, the backward
    # dequantizes one whole weight, and a projection returns its input's dtype under autocast
    quantized: bool = True


@dataclass(frozen=True)
class AttentionRule:
    """How an attention backend groups the sequence."""

    group_size: Callable[[int, AttentionConfig], int]  # (L, the attention table) -> G; 0: full attention over L


@dataclass(frozen=True)
class Adaptation:
    """What trains."""

    targets: tuple[str, ...]  # adapted linear layers (ALL_LINEAR names)
    rank: int  # LoRA r; 0 = no adapter (full fine-tuning: every weight trains)
    dropout: float  # on the adapter's input
    trainable_embeddings: bool
    trainable_norms: bool


@dataclass(frozen=True)
class AdapterRule:
    adaptation: Callable[[AdapterConfig], Adaptation]


@dataclass(frozen=True)
class Zero:
    """The DeepSpeed ZeRO settings that cost memory (stage 0 = plain DeepSpeed fp16)."""

    stage: int = 0
    offload_optimizer: bool = False
    bucket: int = 0  # elements of each contiguous-gradient reduce bucket
    buckets: int = 0  # 2 with overlap_comm (double buffering), 1 without, 0 without contiguous gradients


@dataclass(frozen=True)
class EngineRule:
    """What an engine does to memory, asked of the engine's own fact functions where it has them."""

    autocasts: Callable[[str, str], bool]  # (precision, device type "cuda" | "cpu") -> the forward runs under autocast
    zero: Callable[[Recipe], Zero | None]  # the ZeRO settings; None: the engine keeps gradients and states whole


RULE_TYPES = {"quantization": QuantizationRule, "attention": AttentionRule, "adapter": AdapterRule,
              "engine": EngineRule}
_RULES: dict[str, dict[str, object]] = {kind: {} for kind in RULE_TYPES}


def register_memory_rule(kind: str, name: str, rule) -> None:
    """The memory rule of backend `name` of `kind` (registry.register's kind and name)."""
    if kind not in RULE_TYPES:
        raise PlanError(f"register_memory_rule({kind!r}, {name!r}): {kind} backends have no memory rule; the kinds "
                        f"that have one are {', '.join(RULE_TYPES)}")
    if not isinstance(rule, RULE_TYPES[kind]):
        raise PlanError(f"register_memory_rule({kind!r}, {name!r}, {type(rule).__name__}): a {kind} rule is a "
                        f"harness.memory.rules.{RULE_TYPES[kind].__name__}")
    _RULES[kind][name] = rule


def rule_for(kind: str, name: str):
    """The memory rule of backend `name` of `kind`, after the entry points had their chance to register one."""
    if name not in _RULES[kind]:
        registry.load_backends()
    if name not in _RULES[kind]:
        rule_type = RULE_TYPES[kind].__name__
        raise PlanError(
            f"{kind}.name = {name!r}: the memory planner has no rule for this {kind} backend (it has rules for "
            f"{', '.join(sorted(_RULES[kind]))}). Register one where the backend is registered: "
            f"harness.memory.register_memory_rule({kind!r}, {name!r}, harness.memory.rules.{rule_type}(...))")
    return _RULES[kind][name]


# --------------------------------------------------------------------------- the built-in backends' rules

def nf4_bytes(numel: int, double_quant: bool) -> int:
    """One NF4 linear weight with its bitsandbytes quantization state."""
    blocks = math.ceil(numel / 64)  # one absmax per 64 weights
    packed = math.ceil(numel / 2)  # two 4-bit codes per byte
    if not double_quant:
        return packed + 4 * blocks + 16 * 4  # fp32 absmax + the 16-entry fp32 NF4 code
    # double quantization: uint8 absmax, one fp32 absmax per 256 of them, a 256-entry fp32 code,
    # an fp32 offset, and the 16-entry NF4 code (each a separate tensor per layer)
    return packed + blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4 + 16 * 4


def _lora(adapter: AdapterConfig) -> Adaptation:
    return Adaptation(targets=_targets(adapter.target_modules), rank=adapter.r, dropout=adapter.dropout,
                      trainable_embeddings=adapter.trainable_embeddings, trainable_norms=adapter.trainable_norms)


def _targets(modules: list[str]) -> tuple[str, ...]:
    if list(modules) == ["all-linear"]:
        return ALL_LINEAR
    return tuple(name for name in ALL_LINEAR if any(m == name or m.endswith(f".{name}") for m in modules))


def _autocasts(engine_module, precision: str, device: str) -> bool:
    """Whether the engine's forward runs under autocast, as its own fact function says (autocast_dtype)."""
    return engine_module.autocast_dtype(precision, device) is not None


def _deepspeed_zero(recipe: Recipe) -> Zero:
    """engine.deepspeed_config's ZeRO section, with DeepSpeed's defaults; offload as the engine decides it."""
    config = read_json(find_relative(recipe.engine.deepspeed_config, recipe.source, key="engine.deepspeed_config"))
    zero = config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    contiguous = zero.get("contiguous_gradients", True)
    overlap = zero.get("overlap_comm", stage == 3)  # DeepSpeed's defaults
    bucketed = stage in (1, 2) and contiguous
    return Zero(stage=stage, offload_optimizer=deepspeed_engine.offloads_optimizer(config),
                bucket=int(float(zero.get("reduce_bucket_size", 5e8))) if bucketed else 0,
                buckets=(2 if overlap else 1) if bucketed else 0)


BUILTIN_RULES = {
    "quantization": {
        "nf4": QuantizationRule(lambda numel, double_quant, _: nf4_bytes(numel, double_quant),
                                lambda double_quant, _: "NF4" + (" + double-quant absmax" if double_quant else "")),
        # int8 CB (+ an fp32 scale per row, negligible)
        "int8": QuantizationRule(lambda numel, _, __: numel, lambda _, __: "int8"),
        "none": QuantizationRule(lambda numel, _, element: numel * element, lambda _, element: f"{8 * element}-bit",
                                 quantized=False),
    },
    "attention": {
        "s2": AttentionRule(lambda seq_len, a: policy.s2_group_size(seq_len, a.group_ratio, a.group_size)),
        "full": AttentionRule(lambda seq_len, a: 0),
    },
    "adapter": {
        "lora": AdapterRule(_lora),
        "none": AdapterRule(lambda adapter: Adaptation((), 0, 0.0, False, False)),
    },
    "engine": {
        "accelerate": EngineRule(autocasts=lambda precision, device: _autocasts(accelerate_engine, precision, device),
                                 zero=lambda recipe: None),
        "deepspeed": EngineRule(autocasts=lambda precision, device: _autocasts(deepspeed_engine, precision, device),
                                zero=_deepspeed_zero),
    },
}
for _kind, _rules in BUILTIN_RULES.items():
    for _name, _rule in _rules.items():
        register_memory_rule(_kind, _name, _rule)
