"""Attention backends: full attention, or shift short attention (S2) while training.

    full  transformers' own kernels: sdpa, eager, or flash-attn 2 where harness.policy allows.
    s2    LongLoRA's shift short attention (pure kernels in harness.backends.s2), registered
          with transformers' AttentionInterface as "harness_s2". It reads `module.training`
          on every call: model.train() -> S2 over groups; model.eval() -> full causal
          attention, unless attention.at_inference = true (the paper's ablation).

Both pick their kernel by harness.policy.attention_kernel: "auto" is flash-attn only on CUDA
cards of compute capability 8.0 or newer, in 16-bit, when it is installed. No library class is
patched: the settings travel as an `s2_settings` attribute on each attention module (the object
transformers passes to the attention function as `module`: LLaMA's q/k/v_proj module, Phi-3's
fused qkv_proj one), and transformers dispatches on `config._attn_implementation`.

Families (the module's `sliding_window` and `softcap` arguments, as transformers passes them):

    sliding windows  (Mistral, Gemma-2/3's alternating layers, Phi-3, Qwen with use_sliding_window)
                     token i reads j iff i - W < j <= i. An S2 group of G <= W tokens never spans
                     W, so S2 is exact there; a group longer than the window is refused with the
                     family, the window and the fix. Full attention (eval) applies the window.
    soft-capping     (Gemma-2: attn_logit_softcapping) caps the logits with tanh before softmax,
                     which S2's kernels do not compute: "s2" is refused, and "full" runs eager
                     attention (transformers' sdpa refuses soft-capping) unless flash-attn can.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness import policy
from harness.backends.sliding_window import sliding_window_attention
from harness.backends.token_masks import tokens_of
from harness.backends.s2 import causal_attention, shift_short_attention
from harness.errors import HarnessError
from harness.registry import BackendError, register

S2_IMPLEMENTATION = "harness_s2"
_FULL_KERNELS = {"sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2"}


class AttentionError(HarnessError, ValueError):
    """S2 cannot run this model's attention as it is configured; the message says what to change."""


@dataclass(frozen=True)
class S2Settings:
    group_ratio: float = policy.S2_GROUP_RATIO
    group_size: int = 0  # >0: fixed G, overrides ratio
    kernel: str = "auto"  # "auto": harness.policy, per call, for the tensors' device and dtype
    at_inference: bool = False  # use S2 also when module.training is False


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder: anything with q/k/v projections, separate
    (LLaMA, Mistral, Qwen, Gemma) or fused into one qkv_proj (Phi-3)."""
    return [m for m in model.modules()
            if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj")) or hasattr(m, "qkv_proj")]


def family(module) -> str:
    """The model family of a module, for messages: its config's model_type."""
    return getattr(getattr(module, "config", None), "model_type", None) or type(module).__name__


def softcap_of(module) -> float | None:
    """The logit soft-cap a module's attention applies (Gemma-2's attn_logit_softcapping), or None."""
    config = getattr(module, "config", None)
    return getattr(module, "attn_logit_softcapping", getattr(config, "attn_logit_softcapping", None))


def sliding_window_of(module) -> int | None:
    """The window a module's attention is given: its own (Qwen, Gemma: None on full layers), else
    its config's (Mistral, Phi-3), else None."""
    config = getattr(module, "config", None)
    return getattr(module, "sliding_window", getattr(config, "sliding_window", None))


def batch_mask(model, attention_mask, position_ids):
    """The attention_mask to give `model` for a batch, so that every kernel keeps the harness's token rules
    (harness.backends.token_masks: a document starts where its position is 0, padding is 0 in the mask).

    attention_mask (B, L) 0/1, position_ids (B, L) -> None, the (B, L) mask, or a (B, 1, L, L) mask.
    The harness's own kernels (S2, Ulysses) and flash-attn read documents from position_ids as the harness
    does: they get the 2-D mask, None without padding. transformers' sdpa and eager read documents from
    position_ids only when the mask is None, and then start one wherever a position does not follow the
    one before by 1: a PoSE skip (harness.backends.layout) would cut its window into unrelated pieces, and a
    padded row of packed documents would read across them. Where that rule and the harness's differ, they
    get the (B, 1, L, L) mask of the harness's rule (bool for sdpa, additive for eager)."""
    plain = attention_mask is None or bool(attention_mask.all())
    if model.config._attn_implementation not in ("sdpa", "eager") or position_ids is None:
        return None if plain else attention_mask
    packed = bool((position_ids[:, 1:] == 0).any())  # a row holds more than one document
    if _steps_or_restarts(position_ids) and (plain or not packed):  # transformers' rule sees the same documents
        return None if plain else attention_mask
    if any(sliding_window_of(module) for module in attention_modules(model)):
        raise AttentionError(f"{family(model)} has sliding-window layers, and this batch's positions skip (PoSE) or "
                             f"pack documents beside padding, which transformers' {model.config._attn_implementation} "
                             f"attention cannot mask with the window: use attention.kernel = \"flash\", attention.name "
                             f"= \"s2\", or layout.name = \"contiguous\" with data.mode = \"truncate\"")
    return _document_mask(attention_mask, position_ids, model.config._attn_implementation, model.dtype)


def _steps_or_restarts(position_ids) -> bool:
    """Whether every position is its predecessor's + 1 or a new document's 0: transformers' rule and the harness's
    then see the same documents."""
    following, previous = position_ids[:, 1:], position_ids[:, :-1]
    return bool(((following == previous + 1) | (following == 0)).all())


def _document_mask(attention_mask, position_ids, implementation: str, dtype):
    """(B, 1, L, L): query i reads key j iff j <= i, both in one document, j not padding (a padding query reads
    itself, so no row is empty); bool for sdpa, 0 / the dtype's minimum for eager."""
    batch, length = position_ids.shape
    tokens = tokens_of(attention_mask, position_ids, torch.empty(batch, 1, length, 1, device=position_ids.device))
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = causal & (tokens.doc[:, :, None] == tokens.doc[:, None, :]) & tokens.valid[:, None, :]
    allowed = (allowed | torch.eye(length, dtype=torch.bool, device=position_ids.device))[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def model_kernel(kernel: str, model) -> str:
    """attention.kernel for this model on this machine (harness.policy.attention_kernel)."""
    softcapped = any(softcap_of(module) is not None for module in attention_modules(model))
    return policy.attention_kernel(kernel, policy.Device.current(), policy.dtype_name(model.dtype),
                                   installed=policy.flash_installed(), softcapped=softcapped)


@register("attention", "full", description="Full causal attention (sdpa / eager / flash-attn 2)")
def full_attention(model, *, kernel: str = "auto") -> str:
    implementation = _FULL_KERNELS[model_kernel(kernel, model)]
    model.set_attn_implementation(implementation)
    return implementation


@register("attention", "s2", description="Shift short attention in training, full attention in eval (LongLoRA)")
def s2_attention(model, *, kernel: str = "auto", group_ratio: float = policy.S2_GROUP_RATIO, group_size: int = 0,
                 at_inference: bool = False) -> str:
    if kernel != "auto":
        model_kernel(kernel, model)  # an explicit kernel that cannot run here fails now, not mid-step
    register_s2_implementation()
    settings = S2Settings(group_ratio=group_ratio, group_size=group_size, kernel=kernel, at_inference=at_inference)
    modules = attention_modules(model)
    if not modules:
        raise BackendError(f"attention.name = \"s2\": found no attention modules with q/k/v projections in "
                           f"{type(model).__name__}")
    for module in modules:
        _check_softcap(module, softcap_of(module))
        if group_size:  # a fixed group is known now; a group_ratio's is checked at each call
            check_window(module, group_size, sliding_window_of(module))
        module.s2_settings = settings
    model.set_attn_implementation(S2_IMPLEMENTATION)
    return S2_IMPLEMENTATION


def register_s2_implementation() -> None:
    """Make "harness_s2" known to transformers, with the 2-D padding mask it expects."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(S2_IMPLEMENTATION, s2_attention_forward)
    AttentionMaskInterface.register(S2_IMPLEMENTATION, flash_attention_mask)


# --------------------------------------------------------------------------- transformers glue

def s2_attention_forward(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0,
                         position_ids=None, sliding_window=None, softcap=None, head_window=None, **kwargs):
    """transformers AttentionInterface function (registered with `flash_attention_mask`, so the mask
    is (B, L_kv) bool or None). query (B, H, L, D), key/value (B, H_kv, L_kv, D) -> ((B, L, H, D), None).
    sliding_window and softcap are the module's, as its family passes them (None: none). head_window
    (harness.backends.s2.HeadWindow): the global heads this query holds under sequence parallelism."""
    settings = getattr(module, "s2_settings", None)
    if not isinstance(settings, S2Settings):
        raise AttributeError(f"{type(module).__name__} has no s2_settings: set module.s2_settings = S2Settings(...)")
    if dropout:
        raise ValueError(f"harness_s2 attention has no dropout; got dropout={dropout} (set attention_dropout=0)")
    _check_softcap(module, softcap)
    if query.shape[2] != key.shape[2]:  # decoding with a KV cache
        return _cached_causal_attention(query, key, value, attention_mask, scaling, sliding_window), None
    seq_len = query.shape[2]
    if (module.training or settings.at_inference) and seq_len >= 2:  # one token: S2 is causal attention
        group_size = policy.s2_group_size(seq_len, settings.group_ratio, settings.group_size)
        check_window(module, group_size, sliding_window)  # G <= W: the window never cuts a group
        out = shift_short_attention(query, key, value, group_size, attention_mask, position_ids,
                                    kernel=settings.kernel, scaling=scaling, head_window=head_window)
    elif sliding_window and seq_len > sliding_window:
        out = sliding_window_attention(query, key, value, sliding_window, attention_mask, position_ids, scaling)
    else:
        out = causal_attention(query, key, value, attention_mask, position_ids, kernel=settings.kernel,
                               scaling=scaling)
    return out, None


def _check_softcap(module, softcap) -> None:
    if softcap is not None:
        raise AttentionError(
            f"attention.name = \"s2\" cannot run {family(module)}: its attention soft-caps the logits "
            f"(attn_logit_softcapping = {softcap}), which S2's kernels (SDPA, flash-attn varlen) do not compute. "
            f"Use attention.name = \"full\" (eager attention applies the cap)"
        )


def check_window(module, group_size: int, sliding_window: int | None) -> None:
    """S2 groups must fit the module's sliding window: inside it the window never binds, so S2 is exact."""
    if sliding_window and group_size > sliding_window:
        raise AttentionError(
            f"attention.name = \"s2\": {family(module)} attends within a sliding window of {sliding_window} "
            f"tokens (sliding_window = {sliding_window}), shorter than the S2 group of {group_size} tokens, and "
            f"S2 cannot apply a window inside a group. Set attention.group_size to at most "
            f"{sliding_window // 2 * 2}, or a group_ratio x data.max_seq_length within the window, or use "
            f"attention.name = \"full\""
        )


def _cached_causal_attention(query, key, value, attention_mask, scaling, sliding_window=None):
    """Causal attention for the last q_len positions of a KV cache (documents are not tracked).

    query (B, H, q_len, D), key/value (B, H_kv, kv_len, D), attention_mask (B, seen) with
    seen <= kv_len (a static cache has unfilled slots past `seen`) -> (B, q_len, H, D)."""
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    seen = kv_len if attention_mask is None else attention_mask.shape[1]
    key_valid = torch.zeros(batch, kv_len, dtype=torch.bool, device=query.device)
    key_valid[:, :seen] = True if attention_mask is None else attention_mask.bool()
    q_pos = torch.arange(seen - q_len, seen, device=query.device)[:, None]  # (q_len, 1)
    k_pos = torch.arange(kv_len, device=query.device)[None, :]  # (1, kv_len)
    in_window = k_pos > q_pos - sliding_window if sliding_window else True
    allowed = ((k_pos <= q_pos) & in_window & key_valid[:, None, :]) | (k_pos == q_pos)  # (B, q_len, kv_len)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None], scale=scaling,
                                         enable_gqa=heads != key.shape[1])
    return out.transpose(1, 2)
