"""Shift Short Attention (S2-Attn, LongLoRA) without LongLoRA's wrap-around and padding bugs.

Shapes: B batch, L sequence length, H query heads, H_kv key/value heads, D head dim, G group size.

    query (B, H, L, D); key, value (B, H_kv, L, D)      -> output (B, L, H, D)
    attention_mask (B, L): 1/True = token, 0/False = padding; None = no padding
    position_ids (B, L) or (1, L): a new document starts wherever the position is 0

Semantics of `shift_short_attention(query, key, value, G, ...)`:

* Groups. Token i of the first half of the heads is in group i // G: [0, G), [G, 2G), ...
  Token i of the second half is in group (i + G/2) // G: [0, G/2), [G/2, 3G/2), ...
  There is no wrap-around: the shifted half's first group is the half group [0, G/2), and
  no token ever attends to a later token.
* L not divisible by G: the last group of each half is simply shorter (it ends at L), so any
  L >= G works. G must be even, 2 <= G <= L.
* Token i attends to token j iff j <= i, both are in the same group, both are in the same
  document, and j is not padding. A padding query attends only to itself; its output is zero.
* Documents: position_ids equal to 0 start a new document. Groups are counted from the start
  of the row, not of each document; a document boundary only cuts groups further.
* Heads are split along the KV heads: the first ceil(H_kv / 2) KV heads and the query heads that
  share them are unshifted, the rest shifted, so a query head always moves with its KV head. An
  odd H_kv (SmolLM2: 9 heads, 3 KV heads) gives the unshifted part one KV head more (3 + 6
  query heads). MQA (H_kv == 1): the query heads are split instead, the first ceil(H / 2)
  unshifted, and both parts read the single KV head. H must be at least 2.
* With G == L the unshifted half is exactly `causal_attention`.
* Sequence parallelism (harness.backends.sequence_parallel) hands a rank a window of the heads:
  `head_window = HeadWindow(offset, heads, kv_heads)` says the query holds the global query
  heads [offset, offset + H) of a model with `heads` query and `kv_heads` KV heads. The halves
  then follow the global head index, so N ranks together shift exactly the heads one process
  shifts; a rank's window may lie wholly in one half.

Kernels (`kernel=`): "eager" builds the dense (L, L) mask per half of the heads (the readable
reference); "sdpa" runs torch SDPA on grouped views, one call per piece (runs of whole groups
times runs of whole KV heads), with is_causal=True when there is no padding or packing and
otherwise a boolean (G, G) mask per group; it writes all pieces into one output and their
gradients into one dq, dk, dv, so its peak memory stays at full attention's (_PiecewiseSDPA);
"flash" runs flash-attn's varlen kernel with one varlen sequence per (row, group, document);
"auto" asks harness.policy.attention_kernel: "flash" for fp16/bf16 CUDA tensors on Ampere or newer
when flash-attn is installed, else "sdpa".

The padding and document rules (`tokens_of`, `zero_padding`) are harness.backends.token_masks',
sliding-window attention is harness.backends.sliding_window's; how much query one SDPA piece holds
is harness.policy's (`piece_budget`). Every function here is a pure tensor function; the
transformers glue (the attention interface, S2 in training and full attention in eval) is
harness.backends.attention.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from harness import policy
from harness.backends.token_masks import Tokens, tokens_of, zero_padding


class HeadWindow(NamedTuple):
    """The global query heads [offset, offset + H_local) a query holds, of a model with `heads`
    query heads and `kv_heads` KV heads (sequence parallelism: one rank's share after the all-to-all)."""
    offset: int
    heads: int
    kv_heads: int


# ---------------------------------------------------------------------------- public API


def shift_short_attention(query, key, value, group_size, attention_mask=None, position_ids=None,
                          kernel="auto", scaling=None, head_window: HeadWindow | None = None):
    """S2-Attn (see module docstring): query (B, H, L, D), key/value (B, H_kv, L, D) -> (B, L, H, D).
    head_window: which global heads the query holds (None: all of them)."""
    _check_qkv(query, key, value)
    _check_group_size(group_size, query.shape[2])
    tokens = tokens_of(attention_mask, position_ids, query)
    kernel = _select_kernel(kernel, query)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if kernel == "sdpa":
        budget = policy.piece_budget(query.numel(), query.device.type, _math_fallback(query, key, tokens))
        pieces = _sdpa_pieces(query.shape, key.shape[1], group_size, tokens, budget, head_window)
        return zero_padding(_PiecewiseSDPA.apply(query, key, value, pieces, scaling), tokens)
    halves = _split_heads(query, key, value, head_window)
    run = _KERNELS[kernel]
    outs = [run(q, k, v, group_size, shift, tokens, scaling)
            for (q, k, v), shift in zip(halves, (0, group_size // 2)) if q.shape[1]]  # a window may hold one half
    return zero_padding(torch.cat(outs, dim=2), tokens)


def causal_attention(query, key, value, attention_mask=None, position_ids=None, kernel="auto", scaling=None):
    """Full causal attention with the same padding/packing rules: (B, H, L, D) ... -> (B, L, H, D)."""
    _check_qkv(query, key, value)
    tokens = tokens_of(attention_mask, position_ids, query)
    run = _KERNELS[_select_kernel(kernel, query)]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    seq_len = query.shape[2]  # one group covering the whole sequence
    return zero_padding(run(query, key, value, seq_len, 0, tokens, scaling), tokens)


# ---------------------------------------------------------------------------- validation


def _check_qkv(query, key, value) -> None:
    if query.dim() != 4 or key.dim() != 4 or key.shape != value.shape:
        raise ValueError(f"expected query (B, H, L, D) and key, value (B, H_kv, L, D); got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    (b, heads, length, dim), (kb, kv_heads, klength, kdim) = query.shape, key.shape
    if (b, length, dim) != (kb, klength, kdim):
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} differ in B, L or D")
    if heads % kv_heads:
        raise ValueError(f"num_heads={heads} is not a multiple of num_kv_heads={kv_heads}")


def _check_group_size(group_size: int, seq_len: int) -> None:
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group size {group_size!r} must be an even int >= 2 (groups are shifted by G/2)")
    if group_size > seq_len:
        raise ValueError(f"group size {group_size} is larger than the sequence length {seq_len}")


def _head_halves(heads: int, kv_heads: int, window: HeadWindow | None = None) -> list[tuple[slice, slice]]:
    """[(query heads, KV heads) unshifted, (query heads, KV heads) shifted], split along the KV heads.

    With a window the split is the global one (of window.heads, window.kv_heads) cut to the local
    heads: the first local query heads below the global cut are unshifted, and each half reads the
    local KV heads its query heads share (both read the single one when H_kv == 1). A half may be empty."""
    if window is not None:
        return _window_halves(heads, kv_heads, window)
    if heads < 2:
        raise ValueError(f"S2-Attn shifts half of the heads, but num_heads={heads}: it needs at least 2")
    if kv_heads == 1:  # MQA: split the query heads; both parts read the single KV head
        cut = -(-heads // 2)
        return [(slice(0, cut), slice(0, 1)), (slice(cut, heads), slice(0, 1))]
    unshifted_kv = -(-kv_heads // 2)  # ceil: an odd count leaves one more KV head unshifted
    cut = unshifted_kv * (heads // kv_heads)
    return [(slice(0, cut), slice(0, unshifted_kv)), (slice(cut, heads), slice(unshifted_kv, kv_heads))]


def _window_halves(heads: int, kv_heads: int, window: HeadWindow) -> list[tuple[slice, slice]]:
    """_head_halves of local heads [window.offset, window.offset + heads) of a model of window.heads."""
    (global_unshifted, _), _ = _head_halves(window.heads, window.kv_heads)
    cut = min(max(global_unshifted.stop - window.offset, 0), heads)  # local query heads left unshifted
    per_kv = heads // kv_heads  # local query heads per local KV head
    if kv_heads > 1 and cut % per_kv:
        raise ValueError(f"head window {tuple(window)} with {heads} query / {kv_heads} KV heads cuts a KV head's "
                         f"query heads apart; a window must hold whole KV groups")
    return [(slice(0, cut), slice(0, -(-cut // per_kv))), (slice(cut, heads), slice(cut // per_kv, kv_heads))]


def _split_heads(query, key, value, window: HeadWindow | None = None):
    """[(q, k, v) of the unshifted heads, (q, k, v) of the shifted heads] (eager and flash kernels)."""
    heads = query.shape[1]
    (q_unshifted, kv_unshifted), _ = _head_halves(heads, key.shape[1], window)
    queries = _split(query, [q_unshifted.stop, heads - q_unshifted.stop], dim=1)
    if key.shape[1] == 1:
        return [(q, key, value) for q in queries]
    kv_sizes = [kv_unshifted.stop, key.shape[1] - kv_unshifted.stop]
    return list(zip(queries, _split(key, kv_sizes, dim=1), _split(value, kv_sizes, dim=1)))


def _split(x, sizes, dim):
    """torch.split of x (B, H, L, D) along heads (dim 1) or tokens (dim 2), done on the token-major
    view (B, L, H, D): the backward then concatenates gradients into the (B, L, H, D) memory layout
    that transformers' projections produce, instead of zero-filling one full tensor per slice."""
    token_major_dim = {1: 2, 2: 1}[dim]
    return [part.transpose(1, 2) for part in x.transpose(1, 2).split(sizes, dim=token_major_dim)]


def _select_kernel(kernel: str, query) -> str:
    """An explicit kernel runs as asked; "auto" follows harness.policy for the query's device and dtype."""
    if kernel not in policy.KERNELS:
        raise ValueError(f"unknown S2 kernel {kernel!r}; choose one of {', '.join(policy.KERNELS)}")
    if kernel != "auto":
        return kernel
    return policy.attention_kernel("auto", policy.Device.of(query.device), policy.dtype_name(query.dtype),
                                   installed=policy.flash_installed())


# ---------------------------------------------------------------------------- kernels
# Each kernel: q (B, h, L, D), k, v (B, h_kv, L, D), group size G, shift (0 or G/2) -> (B, L, h, D).


def _group_ids(seq_len: int, group_size: int, shift: int, device) -> torch.Tensor:
    """(L,) group index of each token: (i + shift) // G, so the first group has G - shift tokens."""
    return (torch.arange(seq_len, device=device) + shift) // group_size


def _eager_kernel(q, k, v, group_size, shift, tokens: Tokens, scaling):
    """Dense softmax attention under the explicit (L, L) S2 mask."""
    seq_len = q.shape[2]
    group = _group_ids(seq_len, group_size, shift, q.device)
    idx = torch.arange(seq_len, device=q.device)
    allowed = (group[:, None] == group[None, :]) & (idx[None, :] <= idx[:, None])  # (L, L)
    allowed = allowed & (tokens.doc[:, :, None] == tokens.doc[:, None, :]) & tokens.valid[:, None, :]  # (B, L, L)
    allowed = allowed | torch.eye(seq_len, dtype=torch.bool, device=q.device)  # padding rows: never empty
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # (B, h, L, D)
    scores = (q @ k.transpose(-1, -2)) * scaling  # (B, h, L, L)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)  # fp32+ softmax
    return (probs @ v).transpose(1, 2)


def _segments(seq_len: int, group_size: int, shift: int) -> list[tuple[int, int, int]]:
    """(start, length, block) runs of equal groups: the leading partial group [0, shift), the full
    groups, and the trailing partial group; each is one SDPA call with its blocks folded into B."""
    body = (seq_len - shift) // group_size * group_size
    tail = seq_len - shift - body
    return [(start, length, block) for start, length, block in
            ((0, shift, shift), (shift, body, group_size), (shift + body, tail, tail)) if length]


def _sdpa_kernel(q, k, v, group_size, shift, tokens: Tokens, scaling):
    """SDPA over grouped views, one call per segment (full attention: one call)."""
    segments = _segments(q.shape[2], group_size, shift)
    lengths = [length for _, length, _ in segments]
    outs = [_sdpa_blocks(q_seg, k_seg, v_seg, block, _block_mask(tokens, start, length, block), scaling)
            for (start, length, block), q_seg, k_seg, v_seg
            in zip(segments, _split(q, lengths, dim=2), _split(k, lengths, dim=2), _split(v, lengths, dim=2))]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _blocks(x, block):
    """(B, h, n * block, D) -> (B * n, h, block, D); a view when the memory layout allows."""
    return x.transpose(1, 2).reshape(-1, block, x.shape[1], x.shape[-1]).transpose(1, 2)


def _unblocks(x, batch):
    """(B * n, h, block, D) -> (B, n * block, h, D)."""
    return x.transpose(1, 2).reshape(batch, -1, x.shape[1], x.shape[-1])


def _sdpa_blocks(q, k, v, block, mask, scaling):
    """Causal attention inside each run of `block` tokens: (B, h, n * block, D) -> (B, n * block, h, D)."""
    heads = q.shape[1]
    if mask is not None and heads != k.shape[1]:  # masked fused kernels may lack GQA (as in transformers)
        k, v = k.repeat_interleave(heads // k.shape[1], dim=1), v.repeat_interleave(heads // k.shape[1], dim=1)
    out = F.scaled_dot_product_attention(_blocks(q, block), _blocks(k, block), _blocks(v, block), attn_mask=mask,
                                         is_causal=mask is None, scale=scaling, enable_gqa=heads != k.shape[1])
    return _unblocks(out, q.shape[0])


def _block_mask(tokens: Tokens, start, length, block):
    """(B * n, 1, block, block) bool for tokens [start, start + length): causal, same document, key
    not padding, or the diagonal (so no row is empty); None when plain causal masks suffice."""
    if tokens.plain:
        return None
    doc = tokens.doc[:, start:start + length].reshape(-1, block)  # (B * n, block)
    valid = tokens.valid[:, start:start + length].reshape(-1, block)
    causal = torch.ones(block, block, dtype=torch.bool, device=doc.device).tril()
    allowed = (doc[:, :, None] == doc[:, None, :]) & valid[:, None, :] & causal
    return (allowed | torch.eye(block, dtype=torch.bool, device=doc.device))[:, None]


class _Piece(NamedTuple):
    """One SDPA call of S2: some query heads with their KV heads, over one segment of tokens."""
    q_heads: slice
    kv_heads: slice
    tokens: slice
    block: int  # tokens per group in this segment
    mask: torch.Tensor | None  # (B * n, 1, block, block) bool, or None for plain causal blocks


def _math_fallback(query, key, tokens: Tokens) -> bool:
    """Whether CUDA SDPA runs its math kernel on these pieces (harness.policy.sdpa_math_fallback)."""
    return policy.sdpa_math_fallback(policy.Device.of(query.device), policy.dtype_name(query.dtype),
                                     gqa=query.shape[1] != key.shape[1], masked=not tokens.plain)


def _sdpa_pieces(query_shape, kv_heads, group_size, tokens: Tokens, budget: int,
                 window: HeadWindow | None = None) -> list[_Piece]:
    """The SDPA calls of S2 for a query of `query_shape` (B, H, L, D): per half of the heads and
    per segment of equal groups, runs of whole groups times runs of whole KV heads (with the
    query heads that share them; MQA: the half's query heads), each within `budget` query elements."""
    batch, heads, seq_len, dim = query_shape
    pieces = []
    for (q_half, kv_half), shift in zip(_head_halves(heads, kv_heads, window), (0, group_size // 2)):
        if q_half.stop == q_half.start:
            continue  # a head window wholly in the other half
        half_kv = kv_half.stop - kv_half.start
        per_kv = (q_half.stop - q_half.start) // half_kv  # query heads per KV head
        for start, length, block in _segments(seq_len, group_size, shift):
            group_elements = batch * per_kv * block * dim  # one KV head's queries over one group
            groups = length // block
            groups_per_piece = max(1, min(groups, budget // group_elements))
            kv_per_piece = (max(1, min(half_kv, budget // (group_elements * groups)))
                            if groups_per_piece == groups else 1)
            for first_group in range(0, groups, groups_per_piece):
                piece_start = start + first_group * block
                piece_tokens = slice(piece_start, piece_start + min(groups_per_piece, groups - first_group) * block)
                mask = _block_mask(tokens, piece_tokens.start, piece_tokens.stop - piece_tokens.start, block)
                for kv in range(kv_half.start, kv_half.stop, kv_per_piece):
                    kv_stop = min(kv + kv_per_piece, kv_half.stop)
                    q_start = q_half.start + (kv - kv_half.start) * per_kv
                    pieces.append(_Piece(slice(q_start, q_start + (kv_stop - kv) * per_kv), slice(kv, kv_stop),
                                         piece_tokens, block, mask))
    return pieces


def _piece_inputs(q, k, v, piece: _Piece):
    """The piece's (B, h, length, D) views of q and (B, h_kv, length, D) views of k, v."""
    return q[:, piece.q_heads, piece.tokens], k[:, piece.kv_heads, piece.tokens], v[:, piece.kv_heads, piece.tokens]


class _PiecewiseSDPA(torch.autograd.Function):
    """S2 by SDPA, one piece at a time: q (B, H, L, D), k, v (B, H_kv, L, D) -> (B, L, H, D).

    Forward writes every piece into one (B, L, H, D) output; backward adds each piece's
    gradients into dq, dk, dv laid out (B, L, H, D) like the projections' outputs. The
    attention then holds its output and its input gradients once, plus one piece: autograd
    over separate SDPA calls keeps every call's output besides their concatenation and
    concatenates the gradients (1.24x the peak of full attention at 16k).

    On the CPU the pieces run torch's own CPU flash-attention pair (the kernels behind SDPA
    there): forward saves each piece's logsumexp (B, h, L) and backward reads the output back
    from the one buffer. Elsewhere backward recomputes each piece through SDPA (one more S2
    forward, 1/4 of full attention's FLOPs) and saves nothing but q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, pieces, scaling):
        batch, heads, seq_len, dim = q.shape
        out = q.new_empty(batch, seq_len, heads, dim)
        cpu_flash = _cpu_flash_available(q)
        logsumexps = []
        for piece in pieces:
            if cpu_flash:
                piece_out, logsumexp = _cpu_flash_forward(*_piece_inputs(q, k, v, piece), piece, scaling)
                logsumexps.append(logsumexp)
            else:
                piece_out = _sdpa_blocks(*_piece_inputs(q, k, v, piece), piece.block, piece.mask, scaling)
            out[:, piece.tokens, piece.q_heads] = piece_out
        ctx.save_for_backward(q, k, v, out, *logsumexps)
        ctx.pieces, ctx.scaling = pieces, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, *logsumexps = ctx.saved_tensors
        grads = [x.new_zeros(x.shape[0], x.shape[2], x.shape[1], x.shape[3]).transpose(1, 2) for x in (q, k, v)]
        for index, piece in enumerate(ctx.pieces):
            state = (out, logsumexps[index]) if logsumexps else None
            _add_piece_gradients(grads, (q, k, v), grad_out, state, piece, ctx.scaling)
        return *grads, None, None


def _cpu_flash_available(q) -> bool:
    return q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _add_piece_gradients(grads, qkv, grad_out, state, piece: _Piece, scaling) -> None:
    """Add one piece's q, k, v gradients into `grads`: from its saved (output, logsumexp) state,
    else by recomputing it. The piece's transients die on return."""
    inputs = _piece_inputs(*qkv, piece)
    piece_grad_out = grad_out[:, piece.tokens, piece.q_heads]  # (B, length, h, D)
    if state is not None:
        out, logsumexp = state
        piece_grads = _cpu_flash_backward(piece_grad_out, *inputs, out[:, piece.tokens, piece.q_heads], logsumexp,
                                          piece, scaling)
    else:
        inputs = [x.detach().requires_grad_() for x in inputs]
        with torch.enable_grad():
            piece_out = _sdpa_blocks(*inputs, piece.block, piece.mask, scaling)
        piece_grads = torch.autograd.grad(piece_out, inputs, piece_grad_out)
    for grad_view, piece_grad in zip(_piece_inputs(*grads, piece), piece_grads):
        grad_view += piece_grad


def _cpu_flash_forward(q, k, v, piece: _Piece, scaling):
    """q (B, h, length, D), k, v (B, h_kv, length, D) -> output (B, length, h, D), logsumexp."""
    out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _blocks(q, piece.block), _blocks(k, piece.block), _blocks(v, piece.block), 0.0, piece.mask is None,
        attn_mask=_additive_mask(piece.mask, q.dtype), scale=scaling)
    return _unblocks(out, q.shape[0]), logsumexp


def _cpu_flash_backward(grad_out, q, k, v, out, logsumexp, piece: _Piece, scaling):
    """grad_out, out (B, length, h, D) -> gradients of q, k, v as (B, h(_kv), length, D)."""
    token_major = [_blocks(x.transpose(1, 2), piece.block) for x in (grad_out, out)]
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        token_major[0], _blocks(q, piece.block), _blocks(k, piece.block), _blocks(v, piece.block), token_major[1],
        logsumexp, 0.0, piece.mask is None, attn_mask=_additive_mask(piece.mask, q.dtype), scale=scaling)
    return [_unblocks(grad, q.shape[0]).transpose(1, 2) for grad in grads]


def _additive_mask(mask, dtype):
    """The CPU flash kernel takes a float mask: 0 where allowed, -inf elsewhere (None stays None)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def flash_varlen_layout(valid, doc, group_size, shift):
    """Varlen inputs for one half of the heads: each (row, group, document) run of non-padding
    tokens becomes one sequence.

    valid, doc: (B, L). Returns indices (T,) into the flattened B * L tokens, cu_seqlens (N + 1,)
    int32 and the longest sequence length.
    """
    batch, seq_len = valid.shape
    group = _group_ids(seq_len, group_size, shift, valid.device).expand(batch, seq_len)
    row = torch.arange(batch, device=valid.device)[:, None].expand(batch, seq_len)
    indices = valid.flatten().nonzero().squeeze(1)  # (T,)
    keys = torch.stack([row, group, doc], dim=-1).flatten(0, 1)[indices]  # (T, 3)
    starts = torch.ones(len(indices), dtype=torch.bool, device=valid.device)
    starts[1:] = (keys[1:] != keys[:-1]).any(dim=-1)
    bounds = torch.cat([starts.nonzero().squeeze(1), torch.tensor([len(indices)], device=valid.device)])
    max_seqlen = int(bounds.diff().max()) if len(indices) else 0
    return indices, bounds.to(torch.int32), max_seqlen


def _flash_kernel(q, k, v, group_size, shift, tokens: Tokens, scaling):
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise ImportError("kernel='flash' needs flash-attn (CUDA, Ampere or newer GPU): "
                          "pip install flash-attn") from err
    batch, heads, seq_len, dim = q.shape
    indices, cu_seqlens, max_seqlen = flash_varlen_layout(tokens.valid, tokens.doc, group_size, shift)

    def pack(x):  # (B, h, L, D) -> (T, h, D) non-padding tokens in row order
        return x.transpose(1, 2).reshape(batch * seq_len, x.shape[1], dim)[indices]

    out = flash_attn_varlen_func(pack(q), pack(k), pack(v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                 softmax_scale=scaling, causal=True)  # (T, h, D)
    return out.new_zeros(batch * seq_len, heads, dim).index_copy(0, indices, out).view(batch, seq_len, heads, dim)


_KERNELS = {"eager": _eager_kernel, "sdpa": _sdpa_kernel, "flash": _flash_kernel}
