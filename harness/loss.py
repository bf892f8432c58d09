"""The training objective: next-token cross-entropy, optionally without full logits.

`CausalLMLoss` wraps a (peft) causal LM so engines see one module whose forward returns
the loss. With `chunked = True` the output head and the cross-entropy run over chunks of
`chunk_tokens` positions: the (B, L, V) fp32 logits of a long sequence (LLaMA2 at 32k:
32768 x 32000 x 4 B = 4 GiB) never exist at once, and the gradient is taken one chunk's
logits at a time: in the forward itself for a frozen head (LoRA, QLoRA: two head GEMMs per
chunk, the logits turned into their gradient in place), by recomputing each chunk in the
backward for a trained one (three GEMMs).

The loss is the summed NLL over target tokens (labels != -100) divided by `num_targets`: by
default the batch's own target count (its mean, as in transformers); the training loop passes
the step's average count per micro-batch instead, so that every target token of an optimizer
step weighs the same whatever micro-batch or rank it falls in (harness.loop.Loop.train_step).
Under sequence parallelism (`sequence=` a harness.backends.sequence_parallel.SequenceShards)
every rank of the group gets the full micro-batch, runs the model on its shard of each
sequence against the pre-shifted labels of that shard, and returns the same whole-sequence
loss: the group's summed NLL over the same divisor.
The chunk length follows the vocabulary so one chunk's fp32 logits stay at most 128 MiB
(`chunk_tokens_for`: 2**27 B // (4 B x V)): 1048 positions for LLaMA's 32k vocabulary, 682 for
SmolLM2's 49k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from harness.backends.attention import batch_mask

IGNORE_INDEX = -100
CHUNK_LOGIT_BYTES = 2**27  # fp32 logits of one chunk


def chunk_tokens_for(vocab_size: int) -> int:
    return max(64, CHUNK_LOGIT_BYTES // (4 * vocab_size))


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_nll_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed NLL of one chunk: hidden (N, d), targets (N,) -> scalar (at least fp32)."""
    logits = _at_least_fp32(head(hidden))  # (N, V), only this chunk
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                          chunk_tokens: int = 1024) -> torch.Tensor:
    """Mean next-token NLL from final hidden states (B, L, d) and labels (B, L).

    Position t predicts labels[t + 1]; chunks of `chunk_tokens` flattened positions are
    checkpointed, so peak extra memory is one chunk's logits instead of (B, L, V).
    """
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(L-1), d)
    targets = labels[:, 1:].reshape(-1)  # (B*(L-1),)
    count = (targets != IGNORE_INDEX).sum()
    return chunked_nll_sum(hidden, head, targets, chunk_tokens) / count.clamp(min=1)


def chunked_nll_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                    chunk_tokens: int = 1024) -> torch.Tensor:
    """Summed NLL of hidden (N, d) against targets (N,), one chunk of `chunk_tokens` at a time.

    A frozen head's loss takes its gradient as it goes (_NllSumTakingGradient: the head runs
    once forward and once backward per chunk, and one (n, V) fp32 buffer serves the chunk); a
    trained or ZeRO-3-partitioned one is checkpointed per chunk (forward, then forward again
    and backward, with the log-softmax and two gradients of (n, V) at once).
    """
    if torch.is_grad_enabled() and hidden.requires_grad and _frozen_and_whole(head):
        return _NllSumTakingGradient.apply(hidden, targets, head, chunk_tokens)
    total = _at_least_fp32(hidden.new_zeros(()))
    for start in range(0, targets.numel(), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_nll_sum, head, hidden[piece], targets[piece], use_reentrant=False)
    return total


def _frozen_and_whole(head: torch.nn.Module) -> bool:
    """No parameter trains and none is a ZeRO-3 partition (whose gathering follows module hooks)."""
    return not any(p.requires_grad or hasattr(p, "ds_id") for p in head.parameters())


class _NllSumTakingGradient(torch.autograd.Function):
    """Summed NLL of hidden (N, d) through a frozen head; its gradient w.r.t. hidden is taken
    chunk by chunk in the forward and kept, (N, d) like the gradient the backward would build."""

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk_tokens):
        gradient = torch.empty_like(hidden)
        total = _at_least_fp32(hidden.new_zeros(()))
        for start in range(0, targets.numel(), chunk_tokens):
            piece = slice(start, start + chunk_tokens)
            nll, gradient[piece] = _chunk_nll_sum_and_gradient(head, hidden[piece], targets[piece])
            total += nll
        ctx.save_for_backward(gradient)
        ctx.spent = False
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.spent:
            raise RuntimeError("the chunked loss's backward ran twice; its gradient is scaled in place once")
        ctx.spent = True
        (gradient,) = ctx.saved_tensors
        return gradient.mul_(grad_total.to(gradient.dtype)), None, None, None


def _chunk_nll_sum_and_gradient(head: torch.nn.Module, hidden: torch.Tensor,
                                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, its gradient w.r.t. hidden) of one chunk, hidden (n, d), targets (n,).

    One (n, V) fp32 buffer holds the logits, then in place their softmax, then the logits'
    gradient softmax - onehot(target); the head's own backward takes it to hidden. (A 16-bit
    head's output buffer is reused for that gradient's cast.)
    """
    with torch.enable_grad():
        leaf = hidden.detach().requires_grad_()
        out = head(leaf)  # (n, V); the head's backward needs its weight, not this output
    logits = _at_least_fp32(out.detach())  # out itself where it is fp32 or wider
    picked = targets.clamp(min=0)[:, None]  # (n, 1); ignored rows are zeroed below
    target_logits = logits.gather(1, picked).squeeze(1)
    peak = logits.amax(dim=1, keepdim=True)
    probs = logits.sub_(peak).exp_()
    sums = probs.sum(dim=1, keepdim=True)
    probs.div_(sums)
    counted = targets != IGNORE_INDEX
    nll = (sums.log().add_(peak).squeeze(1) - target_logits).mul_(counted).sum()
    probs.scatter_add_(1, picked, probs.new_full(picked.shape, -1.0))  # softmax - onehot: d nll / d logits
    upstream = probs if out.dtype == probs.dtype else out.detach().copy_(probs)
    (gradient,) = torch.autograd.grad(out, leaf, upstream)
    return nll, gradient.mul_(counted[:, None])  # rows are independent: an ignored row has no gradient


def full_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain reference: logits (B, L, V) -> mean next-token NLL."""
    return F.cross_entropy(_at_least_fp32(logits[:, :-1].reshape(-1, logits.shape[-1])), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


class SoftCapped(torch.nn.Module):
    """An output head whose logits are soft-capped as the model's own forward caps them
    (Gemma-2's final_logit_softcapping): cap * tanh(logits / cap)."""

    def __init__(self, head: torch.nn.Module, cap: float):
        super().__init__()
        self.head, self.cap = head, cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(self.head(hidden) / self.cap)


def output_head(causal_lm) -> torch.nn.Module:
    """The head the chunked loss runs: the model's output embeddings, soft-capped where its config says."""
    head = causal_lm.get_output_embeddings()
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    return SoftCapped(head, cap) if cap else head


class CausalLMLoss(torch.nn.Module):
    """forward(input_ids, labels, attention_mask, position_ids, num_targets) -> scalar loss."""

    def __init__(self, model: torch.nn.Module, *, chunked: bool = True, chunk_tokens: int = 0, sequence=None):
        super().__init__()
        self.model = model
        self.chunked = chunked
        self.chunk_tokens = chunk_tokens or chunk_tokens_for(model.get_output_embeddings().out_features)
        self.sequence = sequence  # SequenceShards under sequence parallelism, else None

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None,
                num_targets: float | None = None) -> torch.Tensor:
        """Summed NLL of the batch's targets / num_targets (None: the batch's own target count, its mean)."""
        if num_targets is None:
            num_targets = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)  # the whole batch's targets
        if self.sequence is not None:
            return self._sharded_nll(input_ids, labels, attention_mask, position_ids) / num_targets
        attention_mask = batch_mask(self.model, attention_mask, position_ids)  # documents, PoSE skips, padding
        targets = labels[:, 1:].reshape(-1)  # (B*(L-1),): position t predicts labels[t + 1]
        if not self.chunked:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            logits = _at_least_fp32(logits[:, :-1].reshape(-1, logits.shape[-1]))  # (B*(L-1), V)
            return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / num_targets
        causal_lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids).last_hidden_state  # (B, L, d)
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(L-1), d)
        return chunked_nll_sum(hidden, output_head(causal_lm), targets, self.chunk_tokens) / num_targets

    def _sharded_nll(self, input_ids, labels, attention_mask, position_ids) -> torch.Tensor:
        """Sequence parallelism: this rank's shard of every sequence in, the whole sequence's summed NLL out."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        shard = self.sequence.shard({"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                                     "attention_mask": attention_mask})
        targets = shard["shift_labels"].reshape(-1)  # (B * L/N,): already the next tokens
        mask = shard.get("attention_mask")
        if not self.chunked:
            logits = self.model(input_ids=shard["input_ids"], attention_mask=mask,
                                position_ids=shard["position_ids"]).logits  # (B, L/N, V)
            nll = F.cross_entropy(_at_least_fp32(logits.reshape(-1, logits.shape[-1])), targets,
                                  ignore_index=IGNORE_INDEX, reduction="sum")
        else:
            causal_lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            hidden = causal_lm.get_decoder()(input_ids=shard["input_ids"], attention_mask=mask,
                                             position_ids=shard["position_ids"]).last_hidden_state  # (B, L/N, d)
            nll = chunked_nll_sum(hidden.reshape(-1, hidden.shape[-1]), output_head(causal_lm), targets,
                                  self.chunk_tokens)
        return self.sequence.sum(nll)
