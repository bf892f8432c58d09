"""Quantization backends: the `quantization_config` the base weights are loaded with.

    nf4   bitsandbytes 4-bit NormalFloat (QLoRA), double quantization on by default. The
          storage dtype can be the compute dtype, which ZeRO-3 needs to shard the packed
          weights like any other tensor (the harness's FSDP2 shards uint8 as well).
    int8  bitsandbytes LLM.int8().
    none  load the weights unquantized in model.dtype.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from harness import policy
from harness.registry import register

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "uint8": torch.uint8}
BNB = (("bitsandbytes", "bitsandbytes>=0.48"),)


@register("quantization", "nf4", description="bitsandbytes NF4 4-bit + double quantization (QLoRA)", requires=BNB)
def nf4_quantization(*, double_quant: bool = True, compute_dtype: str = "bf16", storage_dtype: str = "uint8"):
    from transformers import BitsAndBytesConfig

    device = policy.Device.current()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=TORCH_DTYPES[policy.compute_dtype(compute_dtype, device)],
        bnb_4bit_quant_storage=TORCH_DTYPES[policy.compute_dtype(storage_dtype, device)],
    )


@register("quantization", "int8", description="bitsandbytes LLM.int8() 8-bit weights", requires=BNB)
def int8_quantization():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


@register("quantization", "none", description="No quantization: weights in model.dtype")
def no_quantization(**_quantization_settings):
    # Accepts the 4-bit settings so `quantization.name=none` alone switches a recipe to 16-bit.
    return None


@contextlib.contextmanager
def training_layout_kept(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate without changing how a 4-bit model trains afterwards.

    bitsandbytes (0.50) on an AVX512-BF16 CPU repacks a Linear4bit's NF4 weight for inference the
    first time the layer runs in eval mode without gradients, and from then on multiplies with
    gemv_4bit, which has no autograd: the input gradient through the layer becomes None and the
    training after an evaluation silently differs from training without it (until a checkpoint
    save unpacks the weight). For the duration, every 4-bit layer keeps the layout it trains with
    (the evaluation then runs the dequantizing matmul that training runs)."""
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for layer in layers:
            layer.support_avx512bf16_for_cpu = True
