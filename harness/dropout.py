"""LoRA dropout with cheaper masks on the CPU: the same distribution from a third of the random bits' cost.

peft's LoRA computes lora_B(lora_A(dropout(x))) with nn.Dropout, whose CPU mask is a float
tensor filled by bernoulli_: 15% of a SmolLM2 training step on a 2-core CPU (one mask per LoRA
module, drawn again when checkpointing recomputes the layer). Here each element keeps its
input with probability 1 - p as before, decided by one 32-bit lane of torch's CPU generator
(two lanes per 64-bit draw): P(drop) = round(p * 2^32) / 2^32, within 2.3e-10 of p. The mask is
saved as bool (1 byte an element, not 4). Draws come from torch's generator, so a seed
reproduces them and non-reentrant checkpointing, which restores that generator's state before
recomputing, draws the same mask again. On other devices nn.Dropout runs as it is (CUDA's fused
kernel is already cheap).
"""
from __future__ import annotations

import torch
from torch import nn

LANES = 2**32


class CpuLoraDropout(nn.Dropout):
    """nn.Dropout whose training-mode CPU masks come from keep_mask(); elsewhere nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if self.p == 1:
            return torch.zeros_like(x)
        return _MaskedScale.apply(x, keep_mask(x.shape, self.p), 1.0 / (1.0 - self.p))


class _MaskedScale(torch.autograd.Function):
    """x * keep / (1 - p), saving only the bool mask."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.mul(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None, None


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """bool tensor of `shape`, True with probability 1 - p: one 32-bit lane of a 64-bit draw each."""
    count = shape.numel()
    draws = torch.empty((count + 1) // 2, dtype=torch.int64).random_(-2**63, 2**63 - 1)
    lanes = draws.view(torch.int32)[:count].view(shape)  # uniform over [-2^31, 2^31)
    threshold = round(p * LANES) - LANES // 2  # lanes below it drop: round(p * 2^32) of 2^32 values
    return lanes >= threshold


def use_cpu_lora_dropout(model: nn.Module) -> int:
    """Swap peft's lora_dropout nn.Dropout modules for CpuLoraDropout (same p); returns how many."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is nn.Dropout:
                dropouts[name] = CpuLoraDropout(dropout.p)
                swapped += 1
    return swapped
