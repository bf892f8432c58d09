"""Ulysses sequence parallelism (DeepSpeed's ALST) under the harness's attention, S2 included.

N ranks of one sequence-parallel group train on the same micro-batch: each holds 1/N of every
sequence, from the embeddings to the loss. Attention needs the whole sequence, so DeepSpeed's
`UlyssesSPAttentionHF` trades sequence for heads around it with two all-to-alls:

    q (B, H, L/N, D), k, v (B, H_kv, L/N, D)   -> all-to-all ->   q (B, H/N, L, D), k, v (B, H_kv/N, L, D)
    core attention over the whole sequence for H/N of the heads   (B, L, H/N, D)
    -> all-to-all ->   (B, L/N, H * D), this rank's tokens of every head

The core is the harness's own attention, not transformers': S2 (harness_s2) with the rank's
global heads as a `HeadWindow`, so which heads are shifted follows the global head index and
SP = N computes SP = 1's function; full attention is harness.backends.s2.causal_attention.
Both keep padding and packed documents apart: the 2-D padding masks of all shards are
gathered (DeepSpeed itself drops the mask) and DeepSpeed gathers the position_ids, where a 0
starts a document. Fewer KV heads than N ranks: DeepSpeed replicates each KV head over
N / H_kv ranks (N must be a multiple of H_kv, or H_kv of N).

The loss side (harness.loss.CausalLMLoss with a `SequenceShards`): the full micro-batch is
padded to a multiple of N, its labels shifted before it is cut (a shard's last position
predicts the next shard's first token), and the summed NLL of every shard over the group's
target count is the loss of the whole sequence on every rank. The core attention sees the
sequence without that padding (it is cut off after the all-to-all and its rows filled with
zeros), so S2's group size follows the batch's own length, as in one process. DeepSpeed sums the gradients of
a sequence-parallel group (and averages over data-parallel replicas), so each rank back-
propagates only its own shard's share of that loss, except where DeepSpeed averages the
group's gradients instead (ZeRO-3's reduce-scatter divides by every rank, SP ranks included):
there the share is scaled by N (`gradient_scale`), so every engine ends with the gradient of
the whole sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.backends.s2 import HeadWindow, causal_attention
from harness.errors import HarnessError
from harness.registry import register_validator

ULYSSES_IMPLEMENTATION = "harness_ulysses"
IGNORE_INDEX = -100
_CORE_KERNELS = {"sdpa": "sdpa", "flash_attention_2": "flash"}  # transformers' names -> harness kernels


class SequenceParallelError(HarnessError, ValueError):
    """A model or launch that Ulysses cannot split; the message names the values and the fix."""


# --------------------------------------------------------------------------- the group

class SequenceShards:
    """One rank's place in its sequence-parallel group: which 1/N of each sequence it holds."""

    def __init__(self, group, rank: int, size: int, gradient_scale: int = 1):
        self.group, self.rank, self.size = group, rank, size
        self.gradient_scale = gradient_scale  # N where the engine averages the group's gradients, else 1
        self.length = 0  # the current micro-batch's length before padding to a multiple of N

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full micro-batch (B, L) -> this rank's (B, L'/N) slice, L' = L rounded up to a multiple of N.

        `labels` becomes `shift_labels` (the label of the next position, -100 at the end), taken
        before the cut: position L/N - 1 of shard r predicts the first token of shard r + 1."""
        self.length = batch["input_ids"].shape[1]
        batch = pad_to_multiple({name: tensor for name, tensor in batch.items() if tensor is not None}, self.size)
        labels = batch.pop("labels")
        batch["shift_labels"] = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        width = labels.shape[1] // self.size
        return {name: tensor[:, self.rank * width:(self.rank + 1) * width] for name, tensor in batch.items()}

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The group's sum of a scalar. Its gradient is this rank's own x gradient_scale: the engine's
        reduction of the group's gradients (a sum, or a mean undone by the scale) then gives the sum's."""
        import torch.distributed as dist

        total = value.detach().clone()
        dist.all_reduce(total, group=self.group)
        scaled = value * self.gradient_scale
        return scaled + (total - scaled.detach())


def pad_to_multiple(batch: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """Right-pad (B, L) input_ids / labels / attention_mask / position_ids to a multiple of `multiple`,
    as harness.data.collate pads: no target, masked out, positions counting on."""
    length = batch["input_ids"].shape[1]
    extra = -length % multiple
    if not extra:
        return dict(batch)
    padded = {
        "input_ids": F.pad(batch["input_ids"], (0, extra), value=0),
        "labels": F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX),
        "attention_mask": F.pad(_mask_of(batch), (0, extra), value=0),
    }
    positions = batch["position_ids"]
    steps = torch.arange(1, extra + 1, device=positions.device, dtype=positions.dtype)
    padded["position_ids"] = torch.cat([positions, positions[:, -1:] + steps], dim=1)
    return padded


def _mask_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"]) if mask is None else mask


# --------------------------------------------------------------------------- checks

@register_validator
def check_recipe(recipe) -> None:
    """engine.sequence_parallel_size > 1: the DeepSpeed engine, a kernel that takes a 2-D mask, and
    (when the recipe gives the shape) heads that split over N ranks; run at recipe load
    (harness.registry.validators). The launch is checked at start (check_world)."""
    size = recipe.engine.sequence_parallel_size
    if size <= 1:
        return
    if recipe.engine.name != "deepspeed":
        raise SequenceParallelError(
            f"engine.sequence_parallel_size = {size} needs engine.name = \"deepspeed\" (Ulysses, DeepSpeed's "
            f"ALST), not {recipe.engine.name!r}: accelerate's own sequence parallelism runs only through its DeepSpeed "
            f"plugin, which forms no multi-rank group on the CPU, and its context parallelism needs FSDP2 on CUDA "
            f"with torch's SDPA, not S2. Set engine.name = \"deepspeed\" and engine.deepspeed_config = "
            f"\"launch/deepspeed/zero2_sp.json\""
        )
    if recipe.attention.kernel == "eager":
        raise SequenceParallelError(
            f"attention.kernel = \"eager\" with engine.sequence_parallel_size = {size}: eager attention "
            f"builds a (B, 1, L, L) mask of one rank's shard, not of the whole sequence. Use attention.kernel = "
            f"\"sdpa\" or \"auto\""
        )
    init = recipe.model.init_config
    if recipe.model.name_or_path == "random" and "num_attention_heads" in init:
        heads = int(init["num_attention_heads"])
        check_heads(heads, int(init.get("num_key_value_heads") or heads), size)


def check_heads(heads: int, kv_heads: int, size: int) -> None:
    """Ulysses gives each rank H/N query heads and H_kv/N KV heads (or one KV head replicated)."""
    fix = f"choose engine.sequence_parallel_size among {', '.join(map(str, _sizes_for(heads, kv_heads)))}"
    if heads % size:
        raise SequenceParallelError(f"engine.sequence_parallel_size = {size} does not divide the model's "
                                    f"{heads} attention heads (num_attention_heads): {fix}")
    if kv_heads % size and size % kv_heads:
        raise SequenceParallelError(f"engine.sequence_parallel_size = {size} and the model's {kv_heads} KV heads "
                                    f"(num_key_value_heads): neither divides the other, so the KV heads cannot be "
                                    f"split or replicated evenly: {fix}")


def _sizes_for(heads: int, kv_heads: int) -> list[int]:
    return [n for n in range(1, heads + 1) if heads % n == 0 and (kv_heads % n == 0 or n % kv_heads == 0)]


def check_world(world_size: int, size: int) -> None:
    if size < 1 or world_size % size:
        raise SequenceParallelError(
            f"engine.sequence_parallel_size = {size} does not divide the {world_size} launched processes: launch a "
            f"multiple of it (deepspeed --num_gpus {max(size, 1) * max(1, world_size // max(size, 1))} ...), or set "
            f"engine.sequence_parallel_size to a divisor of {world_size}")


# --------------------------------------------------------------------------- attention

def enable(model, shards: SequenceShards, micro_batch_size: int) -> str:
    """Run `model`'s attention (harness_s2, sdpa or flash-attn, as the attention backend chose) under
    Ulysses over `shards.group`; returns the implementation name now set on the model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config()
    check_heads(config.num_attention_heads, config.num_key_value_heads, shards.size)
    current = base.config._attn_implementation
    if current == ULYSSES_IMPLEMENTATION:
        return current
    core = _core_attention(current)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ULYSSES_IMPLEMENTATION,
                                UlyssesAttention(_unpadded(core, shards), config, shards, micro_batch_size))
    AttentionMaskInterface.register(ULYSSES_IMPLEMENTATION, flash_attention_mask)  # (B, L/N) padding mask or None
    base.set_attn_implementation(ULYSSES_IMPLEMENTATION)
    return ULYSSES_IMPLEMENTATION


def release(shards: SequenceShards) -> None:
    """The engine's teardown: the harness's hold on the sequence-parallel group let go (the engine keeps
    the group referenced until the process ends: engine.keep_groups_until_exit). harness_ulysses is
    registered globally (transformers' AttentionInterface) with DeepSpeed's Ulysses attention, which
    holds the group: it is replaced by a refusal, so no later model runs on a destroyed group, and the
    shards forget the group."""
    from transformers import AttentionInterface

    def torn_down(*args, **kwargs):
        raise SequenceParallelError("sequence parallelism was torn down with its engine: start a new run")

    AttentionInterface.register(ULYSSES_IMPLEMENTATION, torn_down)
    shards.group = None


def _core_attention(implementation: str):
    """The attention run over the whole sequence on each rank's heads."""
    from harness.backends.attention import S2_IMPLEMENTATION, s2_attention_forward

    if implementation == S2_IMPLEMENTATION:
        return s2_attention_forward
    if implementation in _CORE_KERNELS:
        return _causal_core(_CORE_KERNELS[implementation])
    raise SequenceParallelError(
        f"engine.sequence_parallel_size > 1 cannot run {implementation!r} attention: eager attention builds a "
        f"(B, 1, L, L) mask of the local shard, not of the whole sequence. Use attention.kernel = \"sdpa\" or "
        f"\"auto\" (or attention.name = \"s2\")")


def _unpadded(core, shards: SequenceShards):
    """`core` on the first shards.length positions of the gathered sequence (B, ., L', D): the padding
    to a multiple of N is cut off before and comes back as zero rows after. Right padding is never
    read by an earlier token, so the other positions are exactly those of the unpadded sequence."""
    def unpadded_core(module, query, key, value, attention_mask, *, position_ids=None, **kwargs):
        full, length = query.shape[2], shards.length
        if not 0 < length < full:
            return core(module, query, key, value, attention_mask, position_ids=position_ids, **kwargs)
        mask = None if attention_mask is None else attention_mask[:, :length]
        mask = None if mask is not None and bool(mask.all()) else mask
        out, weights = core(module, query[:, :, :length], key[:, :, :length], value[:, :, :length], mask,
                            position_ids=position_ids[:, :length], **kwargs)  # (B, length, h, D)
        return F.pad(out, (0, 0, 0, 0, 0, full - length)), weights

    return unpadded_core


def _causal_core(kernel: str):
    def causal_core(module, query, key, value, attention_mask, *, scaling=None, position_ids=None, **kwargs):
        """Full causal attention over the gathered sequence, padding and packed documents kept apart."""
        return causal_attention(query, key, value, attention_mask, position_ids, kernel=kernel, scaling=scaling), None

    return causal_core


class UlyssesAttention:
    """The function registered as harness_ulysses: gathers the padding mask, then hands q, k, v to
    DeepSpeed's UlyssesSPAttentionHF (one per micro-batch size: it checks shapes against its batch),
    whose core is the harness attention with this rank's HeadWindow."""

    def __init__(self, core, config, shards: SequenceShards, micro_batch_size: int):
        self.core, self.config, self.shards = core, config, shards
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.by_batch = {micro_batch_size: self._ulysses(micro_batch_size)}

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] != key.shape[2]:
            raise SequenceParallelError("generation with a KV cache does not run under sequence parallelism: "
                                        "evaluate or generate in one process (engine.sequence_parallel_size = 1)")
        batch = query.shape[0]
        if batch not in self.by_batch:
            self.by_batch[batch] = self._ulysses(batch)
        ulysses = self.by_batch[batch]
        mask = self._gathered_mask(attention_mask, batch, query.shape[2], query.device)
        window = HeadWindow(self.shards.rank * ulysses.local_q_head_count, self.heads, self.kv_heads)
        return ulysses(module, query, key, value, mask, head_window=window, **kwargs)

    def _ulysses(self, batch: int):
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        return UlyssesSPAttentionHF(attn=self.core, batch_size=batch, attn_head_count=self.heads,
                                    attn_head_size=self.head_dim, kv_head_count=self.kv_heads,
                                    num_hidden_layers=self.config.num_hidden_layers, process_group=self.shards.group,
                                    seq_length_is_variable=True)

    def _gathered_mask(self, attention_mask, batch: int, local_len: int, device) -> torch.Tensor | None:
        """(B, L) bool padding mask of the whole sequence, or None when no shard has padding. A shard
        without padding comes as None (transformers' flash_attention_mask), others as (B, L/N)."""
        import torch.distributed as dist

        local = torch.ones(batch, local_len, dtype=torch.long, device=device)
        if attention_mask is not None:
            local = attention_mask.to(torch.long)
        shards = [torch.empty_like(local) for _ in range(self.shards.size)]
        dist.all_gather(shards, local, group=self.shards.group)  # gloo gathers no bool tensors
        mask = torch.cat(shards, dim=1).bool()
        return None if bool(mask.all()) else mask
