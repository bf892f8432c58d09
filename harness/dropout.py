"""LoRA dropout on the CPU from the gaps between dropped elements: a tenth of the random draws.

peft's LoRA computes lora_B(lora_A(dropout(x))) with nn.Dropout, whose CPU mask is a float
tensor filled by bernoulli_: 15% of a SmolLM2 training step on a 2-core CPU (one mask per LoRA
module, drawn again when checkpointing recomputes the layer). Independent Bernoulli(p) drops
are the same thing as independent Geometric(p) gaps between consecutive drops, so here the
dropped positions are drawn as gaps (torch's geometric_: P(gap = k) = (1 - p)^(k - 1) p), one
draw per dropped element: about p * n draws for n elements, 5% of nn.Dropout's n at p = 0.05.
Only the int64 positions are saved (8 p bytes an element: 0.4 at p = 0.05, against nn.Dropout's
4). The draws come from torch's CPU generator, so a seed reproduces them, and non-reentrant
checkpointing, which restores that generator's state before recomputing, draws the same
positions again. On other devices nn.Dropout runs as it is (CUDA's fused kernel is cheap).
"""
from __future__ import annotations

import math

import torch
from torch import nn

MARGIN_SIGMAS = 6  # first batch of gaps: the expected number of drops + 6 sigma (more are drawn if short)


class CpuLoraDropout(nn.Dropout):
    """nn.Dropout whose training-mode CPU masks come from drop_positions(); elsewhere nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if self.p == 1:
            return torch.zeros_like(x)
        return _DropPositions.apply(x, drop_positions(x.numel(), self.p), 1.0 / (1.0 - self.p))


class _DropPositions(torch.autograd.Function):
    """x * scale, zero at the flat `dropped` positions; saves only those positions."""

    @staticmethod
    def forward(ctx, x, dropped, scale):
        ctx.save_for_backward(dropped)
        ctx.scale = scale
        return _scaled_and_zeroed(x, dropped, scale)

    @staticmethod
    def backward(ctx, grad):
        (dropped,) = ctx.saved_tensors
        return _scaled_and_zeroed(grad, dropped, ctx.scale), None, None


def _scaled_and_zeroed(x: torch.Tensor, dropped: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype)  # contiguous, so flat positions index it
    torch.mul(x, scale, out=out)
    return out.view(-1).index_fill_(0, dropped, 0).view(x.shape)


def drop_positions(count: int, p: float) -> torch.Tensor:
    """Sorted int64 positions in [0, count), each present independently with probability p (0 < p < 1)."""
    pieces, last = [], -1  # last: the position of the latest drop so far
    while last < count:
        expected = (count - last) * p
        gaps = torch.empty(max(16, int(expected + MARGIN_SIGMAS * math.sqrt(expected))), dtype=torch.int64)
        positions = gaps.geometric_(p).cumsum_(0).add_(last)  # P(gap = k) = (1 - p)^(k - 1) p, k >= 1
        pieces.append(positions)
        last = int(positions[-1])
    positions = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return positions[: int(torch.searchsorted(positions, count))]


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
