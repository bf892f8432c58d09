"""The byte model's terms: the bytes of each tensor of a training step on one card, per token or whole,
from a resolved Setup (the weights, LoRA, what a decoder layer saves for its backward, attention scores,
the loss). harness.memory.byte_model adds them up into the parts of a plan; its docstring says which
phases they are live in and what the shape letters mean. Every count follows the code that runs
(transformers' LLaMA layer, peft's LoRA Linear4bit forward, bitsandbytes' MatMul4Bit,
harness.backends.s2, harness.loss); the comments say which tensor each term is.
"""
from __future__ import annotations

import math

from harness.loss import chunk_tokens_for
from harness.policy import PIECE_SHARE

from .runtime import Setup, local_tokens
from .shapes import ALL_LINEAR, ModelShape


# --------------------------------------------------------------------------- static memory

def weight_bytes(setup: Setup) -> tuple[int, int]:
    """(quantized linear layers, unquantized parts: embeddings, norms, lm_head)."""
    shape, dtypes = setup.shape, setup.dtypes
    stored = setup.quantization.stored_bytes  # one linear weight as its quantization backend stores it
    linear = sum(stored(i * o, setup.double_quant, dtypes.base_weights) for i, o in shape.linears().values())
    linear *= shape.layers
    return linear, _unquantized_params(shape) * dtypes.base_weights


def _unquantized_params(shape: ModelShape) -> int:
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)  # embed_tokens + lm_head
    return embeddings + (2 * shape.layers + 1) * shape.hidden  # two norms per layer + the final norm


def lora_params(shape: ModelShape, targets: tuple[str, ...], rank: int) -> int:
    """r * (in + out) per adapted linear layer (lora_A: r x in, lora_B: out x r)."""
    return shape.layers * sum(rank * (i + o) for name, (i, o) in shape.linears().items() if name in targets)


def trainable_params(setup: Setup) -> int:
    """LoRA plus peft's trainable copies (modules_to_save); everything for full fine-tuning."""
    shape = setup.shape
    if setup.rank == 0:
        linear = shape.layers * sum(i * o for i, o in shape.linears().values())
        return linear + _unquantized_params(shape)
    extra = shape.vocab * shape.hidden if setup.trainable_embeddings else 0
    extra += (2 * shape.layers + 1) * shape.hidden if setup.trainable_norms else 0
    return lora_params(shape, setup.targets, setup.rank) + extra


# --------------------------------------------------------------------------- activations

def layer_saved_per_token(setup: Setup) -> dict[str, int]:
    """Bytes per token that one decoder layer saves for its backward, beyond its input.

    With non-reentrant checkpointing this is what the recomputed layer holds during its
    backward; without checkpointing every layer holds it. Split where the backward frees it:
    the MLP block's tensors are gone before the attention's backward runs.
    """
    s, t = setup.shape, setup.dtypes
    q_dim, kv_dim = s.heads * s.head_dim, kv_heads_held(setup) * s.head_dim
    linears = linear_saves(setup)
    # RMSNorm saves its fp32 input (hidden.to(float32)) and rsqrt (B, L, 1): for the input norm
    # that is the layer input itself when the stream is fp32 (no new memory), else a copy; a
    # trained norm weight also saves the normalised input it multiplies.
    normalised = s.hidden * t.stream if norms_train(setup) else 0
    input_norm = (s.hidden * 4 if t.stream != 4 else 0) + 4 + normalised
    post_norm = s.hidden * 4 + 4 + normalised  # the residual sum h, or its fp32 copy
    return {
        "attention block": input_norm + sum(linears.get(n, 0) for n in ("q_proj", "k_proj", "v_proj", "qkv_proj"))
        + (q_dim + 2 * kv_dim) * t.attention,  # q, k after RoPE and v, saved by the kernel
        "mlp block": post_norm + sum(linears.get(n, 0) for n in ("o_proj", "gate_proj", "up_proj", "gate_up_proj",
                                                                 "down_proj"))
        # gate out (SiLU input), act(gate) and up (a fused gate_up: its 2I output + act)
        + 3 * s.intermediate * t.linear,
        "attention output": attention_saved_per_token(setup),
    }


def kv_heads_held(setup: Setup) -> int:
    """KV heads per local token that attention holds: H_kv, or N under SP with H_kv < N (each rank keeps
    one KV head of the whole sequence: N x its share of the tokens)."""
    return max(setup.shape.kv_heads, setup.sequence_parallel) if setup.sequence_parallel > 1 else setup.shape.kv_heads


def norms_train(setup: Setup) -> bool:
    return setup.rank == 0 or setup.trainable_norms


# Linear layers that read the same input tensor (the norm outputs, the attention output, the product).
_SHARED_INPUTS = (("q_proj", "k_proj", "v_proj", "qkv_proj"), ("o_proj",), ("gate_proj", "up_proj", "gate_up_proj"),
                  ("down_proj",))


def linear_saves(setup: Setup) -> dict[str, int]:
    """Bytes per token saved by the trained linear layers, by layer name.

    peft LoRA on a 4-bit linear: result = base(x) + lora_B(lora_A(dropout(x))) * scale.
    MatMul4Bit saves no activation (only the packed weight), so the LoRA branch is all: the
    dropout mask, the dropped input (saved by lora_A) and lora_A's (B, L, r) output (saved by
    lora_B), each a new tensor per adapted layer. Without dropout (peft's nn.Identity) and
    without autocast casts, lora_A saves x itself, like the trained linears of full
    fine-tuning: once per shared input.
    """
    s, t = setup.shape, setup.dtypes
    inputs = {name: i for name, (i, _) in s.linears().items()}
    trained = [name for name in (setup.targets if setup.rank else ALL_LINEAR) if name in inputs]  # this family's
    if setup.rank and (setup.dropout > 0 or setup.autocast):
        mask = t.mask if setup.dropout > 0 else 0
        return {name: round(inputs[name] * (mask + t.lora_input)) + setup.rank * t.lora_input for name in trained}
    firsts = [next((name for name in group if name in trained), None) for group in _SHARED_INPUTS]
    saves = {name: inputs[name] * t.linear for name in firsts if name}
    for name in trained if setup.rank else ():
        saves[name] = saves.get(name, 0) + setup.rank * t.lora_input  # lora_A's output
    return saves


def attention_saved_per_token(setup: Setup) -> int:
    """Fused kernels (SDPA flash / memory-efficient, flash-attn, torch's CPU flash) save
    their output (B, L, H*D) and the fp32 logsumexp (B, H, L); S2's piecewise SDPA keeps its one
    output and, on the CPU, the logsumexp (on a GPU it recomputes it in backward); the
    score-materialising kernels are counted by `attention_scores_bytes`."""
    s = setup.shape
    logsumexp = s.heads * 4 if setup.kernel == "fused" and not (setup.group and setup.device == "cuda") else 0
    return s.heads * s.head_dim * setup.dtypes.attention + logsumexp


def attention_scores_bytes(setup: Setup) -> tuple[int, int]:
    """(saved, transient) bytes of the (.., L, K) score tensors of one layer, 0 for fused kernels.

    Saved: the fp32 softmax output, plus its cast to the compute dtype when that is not fp32.
    Backward transient: the gradients of probabilities and scores (2 x fp32) of the heads
    being differentiated: all of them for full attention, one half of them for S2, whose two
    halves run one after the other.
        eager-full  transformers' eager attention: K = L, and GQA's repeat_kv copies of k, v
        eager-s2    harness S2 "eager" kernel: dense (L, L) masked scores per half, K = L,
                    plus two (B, L, L) bool masks: S2 saves nothing here over full attention
        math        SDPA's math fallback, K = L; for S2 (piecewise SDPA) nothing is saved and the
                    backward holds the scores, probabilities and their gradients of one piece
    """
    if setup.kernel == "fused":
        return 0, 0
    s, b, seq = setup.shape, setup.batch, setup.seq_len
    if setup.kernel == "math" and setup.group:
        heads = s.heads // setup.sequence_parallel  # a rank's heads, over the whole sequence
        piece_queries = max(b * heads * seq // PIECE_SHARE, b * max(1, heads // kv_heads_held(setup)) * setup.group)
        return 0, 3 * 4 * piece_queries * setup.group
    scores = b * (s.heads // setup.sequence_parallel) * seq * seq
    per_score = 4 + (setup.dtypes.attention if setup.dtypes.attention != 4 else 0)
    saved = scores * per_score
    if setup.kernel == "eager-s2":
        saved += 2 * b * seq * seq  # the ~allowed masks saved by masked_fill, one per half
    if setup.kernel.startswith("eager"):
        saved += repeated_kv_bytes(setup)
    share = _unshifted_share(s) if setup.kernel == "eager-s2" else 1.0
    return saved, int(2 * 4 * scores * share)


def repeated_kv_bytes(setup: Setup) -> int:
    """GQA's copies of k and v repeated to one per query head (repeat_kv, SDPA math's enable_gqa): (B, H, L, D)
    each, beyond the H_kv heads of k and v themselves."""
    s = setup.shape
    return 2 * setup.batch * setup.seq_len * (s.heads - s.kv_heads) * s.head_dim * setup.dtypes.attention


def _unshifted_share(shape: ModelShape) -> float:
    """The larger of S2's two head parts, as a share of the heads: ceil(H_kv / 2) of the KV
    heads (ceil(H / 2) query heads for MQA), as harness.backends.s2._head_halves splits them."""
    if shape.kv_heads == 1:
        return math.ceil(shape.heads / 2) / shape.heads
    return math.ceil(shape.kv_heads / 2) / shape.kv_heads


def layer_transient_per_token(setup: Setup) -> int:
    """Backward transients of the recomputed layer at its peak (the MLP's backward), bytes per
    token, in the projections' dtype. Fitted to allocator peaks of whole CPU training steps over
    d = 64..576, I = 2d..6d (bench/plan_validation.py): one (B, L, I) gradient and 3.5 (B, L, d)
    tensors with LoRA dropout; without it the product act(gate) * up is saved instead of freed
    after the recompute and its two gradients (LoRA and base) meet: 2 (B, L, I) + d / 2."""
    s = setup.shape
    if setup.rank and setup.dropout > 0:
        elements = (2 * s.intermediate + 7 * s.hidden) // 2
    else:
        elements = (4 * s.intermediate + s.hidden) // 2
    return elements * setup.dtypes.linear


def dequantize_bytes(setup: Setup) -> int:
    """MatMul4Bit.backward dequantizes one whole weight (out x in) in the compute dtype."""
    if not setup.quantization.quantized:
        return 0
    return max(i * o for i, o in setup.shape.linears().values()) * setup.compute


def loss_bytes(setup: Setup) -> int:
    """Output head + cross-entropy workspace at its peak, bytes.

    The chunked loss through a frozen head (harness.loss._chunk_nll_sum_and_gradient): one fp32
    buffer per logit that becomes the logits' gradient in place, plus the head's 16-bit output
    where there is one (4 or 6 bytes). Otherwise the backward of one chunk (or of all logits):
    the saved fp32 log_softmax, the gradient of the NLL and of the log_softmax (3 x 4 bytes);
    the head's 16-bit output is freed by then.
    """
    if setup.chunked and head_is_frozen(setup):
        return loss_positions(setup) * setup.shape.vocab * (6 if head_outputs_16_bit(setup) else 4)
    return loss_positions(setup) * setup.shape.vocab * 12


def head_outputs_16_bit(setup: Setup) -> bool:
    """The output head's logits come out in 16 bits: under autocast, or from 16-bit weights."""
    return setup.autocast or setup.dtypes.base_weights == 2


def head_is_frozen(setup: Setup) -> bool:
    """LoRA without trained embeddings, and no ZeRO-3 partition of the head (harness.loss._frozen_and_whole)."""
    zero3 = setup.deepspeed is not None and setup.deepspeed.stage == 3
    return setup.rank > 0 and not setup.trainable_embeddings and not zero3


def loss_positions(setup: Setup) -> int:
    """Positions whose logits exist at once: one chunk (harness.loss.chunk_tokens_for, ~128 MiB
    of fp32 logits) when chunked, else all B * (L - 1)."""
    positions = setup.batch * (setup.seq_len - 1) if setup.sequence_parallel == 1 else local_tokens(setup)
    return min(chunk_tokens_for(setup.shape.vocab), positions) if setup.chunked else positions
