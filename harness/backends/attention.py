"""Attention backends: full attention, or shift short attention (S2) while training.

    full  transformers' own kernels: sdpa, eager, or flash-attn 2 when installed.
    s2    LongLoRA's shift short attention (kernels in harness.backends.s2), registered
          with transformers' AttentionInterface as "harness_s2". It reads `module.training`
          on every call: model.train() -> S2 over groups; model.eval() -> full causal
          attention, unless attention.at_inference = true (the paper's ablation).

No library class is patched: the settings travel as an `s2_settings` attribute on each
attention module, and transformers dispatches on `config._attn_implementation`.
"""
from __future__ import annotations

import importlib.util

import torch

from harness.registry import BackendError, register

S2_IMPLEMENTATION = "harness_s2"
_FULL_KERNELS = {"sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2"}


def __getattr__(name):
    # `from harness.backends.attention import shift_short_attention` (the public kernel).
    if name in ("shift_short_attention", "causal_attention"):
        from harness.backends import s2

        return getattr(s2, name)
    raise AttributeError(name)


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def _check_flash(kernel: str) -> None:
    if kernel == "flash" and importlib.util.find_spec("flash_attn") is None:
        raise BackendError(
            "attention.kernel = \"flash\" needs flash-attn (CUDA, Ampere or newer). "
            "Install it with: pip install 'longqlora-harness[flash]', or use attention.kernel = \"sdpa\""
        )


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder (anything with q/k/v projections)."""
    return [m for m in model.modules() if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj"))]


@register("attention", "full", description="Full causal attention (sdpa / eager / flash-attn 2)")
def full_attention(model, *, kernel: str = "auto") -> str:
    _check_flash(kernel)
    implementation = _FULL_KERNELS["flash" if kernel == "auto" and flash_available() else kernel.replace("auto", "sdpa")]
    model.set_attn_implementation(implementation)
    return implementation


@register("attention", "s2", description="Shift short attention in training, full attention in eval (LongLoRA)")
def s2_attention(model, *, kernel: str = "auto", group_ratio: float = 0.25, group_size: int = 0,
                 at_inference: bool = False) -> str:
    from harness.backends.s2 import S2Settings

    _check_flash(kernel)
    register_s2_implementation()
    settings = S2Settings(group_ratio=group_ratio, group_size=group_size, kernel=kernel, at_inference=at_inference)
    modules = attention_modules(model)
    if not modules:
        raise BackendError(f"attention.name = \"s2\": found no attention modules with q/k/v projections in {type(model).__name__}")
    for module in modules:
        module.s2_settings = settings
    model.set_attn_implementation(S2_IMPLEMENTATION)
    return S2_IMPLEMENTATION


def register_s2_implementation() -> None:
    """Make "harness_s2" known to transformers, with the 2-D padding mask it expects."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    from harness.backends.s2 import s2_attention_forward

    AttentionInterface.register(S2_IMPLEMENTATION, s2_attention_forward)
    AttentionMaskInterface.register(S2_IMPLEMENTATION, flash_attention_mask)
