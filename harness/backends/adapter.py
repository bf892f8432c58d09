"""Adapter backends: what is trained on top of the frozen (possibly 4-bit) base.

    lora  peft LoRA on the named linear layers ("all-linear" = every linear layer but the
          output head), optionally with the embeddings and norms trainable as well
          (LongLoRA's "embed,norm"), saved with the adapter through peft's modules_to_save.
    none  full fine-tuning of an unquantized model.
"""
from __future__ import annotations

from harness.dropout import use_cpu_lora_dropout
from harness.quiet import peft_quietly
from harness.registry import register

# Module-name suffixes that LongLoRA's trainable_params "embed,norm" reaches in LLaMA.
EMBEDDING_MODULES = ["embed_tokens"]
NORM_MODULES = ["input_layernorm", "post_attention_layernorm", "norm"]


@register("adapter", "lora", description="LoRA adapters (peft); optional trainable embeddings and norms",
          requires=(("peft", "peft>=0.17"),))
def lora_adapter(model, *, r: int = 64, alpha: int = 16, dropout: float = 0.05,
                 target_modules: list[str] = ("all-linear",), bias: str = "none",
                 trainable_embeddings: bool = False, trainable_norms: bool = False):
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)
    extra = (EMBEDDING_MODULES if trainable_embeddings else []) + (NORM_MODULES if trainable_norms else [])
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias=bias,
        task_type="CAUSAL_LM", modules_to_save=extra or None,
    )
    with peft_quietly():
        model = get_peft_model(model, config)
    use_cpu_lora_dropout(model)  # the same dropout, cheaper masks on the CPU
    for parameter in model.parameters():
        if parameter.requires_grad:  # trainable copies of 16-bit embeddings / norms: fp32 for AdamW, like LoRA
            parameter.data = parameter.data.float()
    return model


@register("adapter", "none", description="Full fine-tuning: every weight trainable (unquantized bases only)")
def no_adapter(model):
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model
