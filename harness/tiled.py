"""train.tiled_mlp: each decoder layer's MLP computed in sequence tiles, recomputed in backward.

The MLP is the largest activation of a long-context step: a LLaMA layer's backward holds
three (B, L, I) intermediates (gate, act(gate), up) and their gradients, I = 2.7 d. DeepSpeed's
ALST `TiledMLP` (deepspeed.runtime.sequence_parallel.ulysses_sp) runs the MLP over tiles of the
sequence without saving anything but its input, and in backward recomputes one tile at a time:
the intermediates of one tile exist at once, at the price of one more MLP forward.

    x (B, L, d) -> ceil(L / T) tiles of (B, <= T, d) -> the MLP on each -> (B, L, d)

Tiles of T = max(d, TILE_FLOOR) tokens: DeepSpeed's d tokens make one tile's (d, I) intermediate
about the size of one MLP weight; the floor keeps small models from many small tiles, each of
which dequantizes every NF4 MLP weight once more (bitsandbytes dequantizes a whole weight per
call): SmolLM2 (d = 576) at 16k in 29 tiles of 576 tokens stepped 3.5x slower than untiled on
the 2-core CPU. The MLP is the module's own forward (peft's LoRA-wrapped projections included), so
any family's MLP tiles; a module keeps its parameters and names (the adapter's keys do not
change): only the instance's `forward` is replaced. The tile count is the largest over the
ranks, so ZeRO-3 ranks gather the same weights the same number of times. MLPs are pointwise in
the sequence, so the result equals the untiled MLP up to float summation order.
"""
from __future__ import annotations

import math
from functools import partial

import torch

TILE_FLOOR = 4096  # tokens: the smallest tile (the largest models' d)


def tile_mlps(model) -> int:
    """Tile the MLP of every decoder layer of `model` (a peft model or a causal LM); returns how many."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = causal_lm.get_decoder().layers
    for layer in layers:
        mlp = layer.mlp
        if not isinstance(mlp.forward, partial):  # already tiled
            mlp.forward = partial(tiled_forward, mlp, type(mlp).forward)
    return len(layers)


def tiles_for(seq_len: int, hidden: int, floor: int | None = None) -> int:
    """How many tiles a sequence of `seq_len` tokens is cut into: tiles of max(hidden, floor) tokens
    (floor: TILE_FLOOR)."""
    return max(1, math.ceil(seq_len / max(hidden, TILE_FLOOR if floor is None else floor)))


def tiled_forward(mlp: torch.nn.Module, forward, x: torch.Tensor) -> torch.Tensor:
    """mlp(x) by DeepSpeed's TiledMLP: x (B, L, d) -> (B, L, d), tiles recomputed in backward."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    tiles = _agreed(tiles_for(x.shape[-2], x.shape[-1]), x.device)
    if tiles == 1:
        return forward(mlp, x)  # one tile saves nothing over the plain MLP
    trained = [p for p in mlp.parameters() if p.requires_grad]  # DeepSpeed reduces their grads after the last tile
    return TiledMLP.apply(forward, mlp, x, tiles, trained)


def _agreed(tiles: int, device) -> int:
    """The most tiles any rank asks for: every rank then runs (and gathers weights for) as many."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tiles
    count = torch.tensor([tiles], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count)
