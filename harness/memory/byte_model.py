"""The byte model: the bytes of each part of a training step on one card, from a resolved Setup.

    result = plan_setup(resolve_setup(recipe, shape, device="cuda", card=card, seq_len=None), recipe)
    result.peak_bytes, result.peak_phase, result.parts

Every byte count (here and in harness.memory.terms) follows the code that runs (transformers' LLaMA layer, peft's LoRA
Linear4bit forward, bitsandbytes' MatMul4Bit, harness.backends.s2, harness.loss, the engines);
the comments say which tensor each term is. Shapes: B micro-batch, L sequence, d hidden, I
intermediate, H / H_kv query / KV heads of D dims, r LoRA rank, V vocabulary, N layers, G S2 group.

The terms (bytes of each tensor) are harness.memory.terms', the result types (Part, MemoryPlan,
EvalPlan, Reach) harness.memory.plans'; this module adds the terms up into the parts of a plan.

The peak is taken over four phases of a training step, each the sum of the parts live then:

    attention  backward through the top decoder layer's attention: every checkpointed hidden
               state, the recomputed layer's attention block and the attention's gradients
    mlp        backward through the top layer's MLP: all the recomputed layer saved, plus the
               MLP's backward transients (the usual peak)
    loss       backward of the output head + cross-entropy (one chunk at a time when chunked)
    step       the optimizer step: gradients, states and the optimizer's temporaries

Static parts (weights, LoRA, optimizer states, engine buffers, the CUDA context) are live in
all four. Validated on the CPU against torch's allocator over the training loop's own steps
(harness.loop_memory, harness.memory.measure, bench/plan_validation.py).

The long-context watch's evaluation (harness.evaluation.in_training, between two steps) is planned
beside the step (MemoryPlan.evaluation): what persists between steps (weights, LoRA, optimizer
states, the CUDA context; gradients are freed by zero_grad) plus one no-grad forward of one
held-out sample, 1 x L, with full attention at L, peaking in one of three phases (L: the length
the recipe reads per sample, resolved.sample_length: the training length, or the target under
PoSE, where training computes a shorter window of each sample):

    eval attention  one layer's attention: q, k, v, the kernel's output, and the larger of the
                    kernel's (1, H, L, L) scores (materialising kernels) and o_proj's forward
    eval mlp        one layer's MLP forward (nothing is saved across layers without gradients)
    eval loss       one chunk of the output head and cross-entropy (all logits when unchunked)

Several cards (`cards`): the plan is one card's. ZeRO partitions the LoRA optimizer states, fp32
master weights and (stage >= 2) gradients over all ranks. Ulysses sequence parallelism
(engine.sequence_parallel_size = N, harness.backends.sequence_parallel) gives each rank B x L/N
tokens from the embeddings to the loss; attention holds the whole sequence for H/N heads (the
same bytes), with KV heads replicated to one per rank when H_kv < N, plus DeepSpeed's
all-to-all send and receive copies. train.tiled_mlp (harness.tiled) leaves the recomputed
layer's MLP holding its input and one tile's intermediates instead of the whole sequence's.
The SP and tiling terms follow the code; unlike the one-card terms they have not been
measured on a GPU.
"""
from __future__ import annotations

import dataclasses
import functools

from harness.recipe import Recipe

from .plans import EVAL_PHASES, PHASES, EvalPlan, MemoryPlan, Part
from .runtime import Setup, local_tokens
from .shapes import MIB
from .terms import (attention_saved_per_token, attention_scores_bytes, dequantize_bytes, head_outputs_16_bit,
                    kv_heads_held, layer_saved_per_token, layer_transient_per_token, linear_saves, lora_params,
                    loss_bytes, loss_positions, norms_train, repeated_kv_bytes, trainable_params, weight_bytes)

GIB = 2**30
# CUDA context + cuBLAS/cuDNN workspaces + caching-allocator slack, which torch's allocator
# counters never see: ~0.5 GiB of context on recent drivers plus ~0.25 GiB of slack.
CUDA_OVERHEAD_BYTES = int(0.75 * GIB)
POOL_KEPT_AT_PEAK = 0.35  # RSS the CPU tensor pool adds at a training step's peak, per byte of train.cpu_cache_mib:
# bench/train_step.py measured +0.07 GB (1k) and +0.10 GB (4k) over the same step without the pool, for 256 MiB


def plan_setup(setup: Setup, recipe: Recipe) -> MemoryPlan:
    """The parts of one training step of `setup` and the phase whose parts sum highest."""
    parts = _static_parts(setup) + _activation_parts(setup)
    card = setup.card
    return MemoryPlan(
        recipe=recipe.source, device=setup.device, card=card.name if card else None,
        capacity_bytes=card.total_bytes if card else None, shape=setup.shape, batch=setup.batch,
        seq_len=setup.seq_len, trainable_params=trainable_params(setup), parts=parts,
        peak_phase=_peak_phase(parts, PHASES), cards=setup.cards, sequence_parallel=setup.sequence_parallel,
        tiled_mlp=setup.tiled_mlp, evaluation=plan_evaluation(setup) if _watch_runs(recipe) else None,
    )


def _peak_phase(parts: list[Part], phases: tuple[str, ...]) -> str:
    peaks = {phase: sum(p.bytes for p in parts if phase in p.phases) for phase in phases}
    return max(peaks, key=peaks.get)


def _watch_runs(recipe: Recipe) -> bool:
    """Whether training evaluates held-out samples (harness.session: data.eval_path, data.eval_fraction, else
    train.eval_holdout training samples, which the planner assumes the data has)."""
    data = recipe.data
    return bool(data.eval_path or data.eval_fraction > 0 or recipe.train.eval_holdout)


def _static_parts(setup: Setup) -> list[Part]:
    trainable = trainable_params(setup)
    return _model_parts(setup) + _gradient_parts(setup, trainable) + _optimizer_parts(setup, trainable) \
        + _overhead_parts(setup)


def _model_parts(setup: Setup) -> list[Part]:
    quantized, unquantized = weight_bytes(setup)
    trainable = trainable_params(setup)
    dtypes = setup.dtypes
    lora = f"{trainable:,} trainable, {8 * dtypes.lora}-bit" if setup.rank else "full fine-tuning: the weights train"
    return [
        Part("weights (quantized linears)" if setup.quantization.quantized else "weights (linears)", quantized,
             note=setup.quantization.label(setup.double_quant, dtypes.base_weights)),
        Part("weights (embeddings, norms, head)", unquantized, note=f"{8 * dtypes.base_weights}-bit"),
        Part("LoRA parameters", trainable * dtypes.lora if setup.rank else 0, note=lora),
    ]


def _gradient_parts(setup: Setup, trainable: int) -> list[Part]:
    zero = setup.deepspeed
    if zero is None:  # .grad of every trainable parameter, set to None by zero_grad after each step
        if setup.grad_accum > 1:
            return [Part("gradients", trainable * setup.dtypes.lora, dynamic=True,
                         note="accumulated across micro-batches")]
        return [Part("gradients", trainable * setup.dtypes.lora, phases=("step",), dynamic=True,
                     note="complete only after the backward")]
    buckets = zero.buckets * zero.bucket * 2  # 16-bit reduce buckets, allocated whole at every backward
    overlap = ", overlap_comm" if zero.buckets == 2 else ""
    parts = [Part(f"ZeRO-{zero.stage} gradient buckets", buckets, phases=("attention", "mlp", "loss"), dynamic=True,
                  note=f"{zero.buckets} x {zero.bucket:,} elements (reduce_bucket_size{overlap})")]
    share = _zero_share(setup, trainable, stage=2)
    if zero.offload_optimizer:
        return parts + [Part("gradients", 0, cpu_bytes=4 * share, note="fp32, offloaded to CPU", dynamic=True)]
    return parts + [Part("gradients", 4 * share, note="fp32 partition" + _over_cards(setup), dynamic=True)]


def _zero_share(setup: Setup, elements: int, *, stage: int) -> int:
    """Elements of a ZeRO-partitioned tensor one rank keeps: 1/cards from `stage` on (ZeRO-1 the optimizer
    states and master weights, ZeRO-2 the gradients too), the whole tensor below it or without ZeRO."""
    zero = setup.deepspeed
    partitioned = zero is not None and zero.stage >= stage
    return -(-elements // setup.cards) if partitioned else elements


def _over_cards(setup: Setup) -> str:
    return f", 1/{setup.cards} per card" if setup.deepspeed is not None and setup.cards > 1 else ""


def _optimizer_parts(setup: Setup, trainable: int) -> list[Part]:
    """Adam: two fp32 moments per trainable parameter (+ an fp32 master copy under DeepSpeed).
    torch and bitsandbytes create the moments at the first step; DeepSpeed at initialisation."""
    zero = setup.deepspeed
    trainable = _zero_share(setup, trainable, stage=1)
    moments = 8 * trainable
    if setup.optimizer == "deepspeed_cpu_adam":
        return [Part("optimizer states", 0, cpu_bytes=moments + 4 * trainable,
                     note="ZeRO offload: fp32 master + 2 moments in CPU RAM" + _over_cards(setup))]
    if setup.optimizer == "paged_adamw_32bit":
        parts = [Part("optimizer states (paged)", moments, dynamic=zero is None,
                      note="bitsandbytes paged: evicted to CPU RAM under pressure")]
    else:
        parts = [Part("optimizer states", moments, dynamic=zero is None, note="AdamW, 2 x fp32" + _over_cards(setup))]
    if zero is not None:
        parts.append(Part("fp32 master weights", 4 * trainable, note="DeepSpeed mixed precision"))
    if setup.optimizer == "adamw" and setup.device == "cuda":
        # foreach AdamW materialises sqrt(exp_avg_sq) for every parameter at once
        parts.append(Part("optimizer step temporaries", 4 * trainable, phases=("step",), dynamic=True,
                          note="foreach AdamW: sqrt(v), fp32"))
    return parts


def _overhead_parts(setup: Setup) -> list[Part]:
    if setup.device != "cuda":
        if not setup.cpu_pool:
            return []
        return [Part("CPU tensor pool", round(POOL_KEPT_AT_PEAK * setup.cpu_pool), dynamic=True,
                     note=f"freed blocks kept for reuse at the peak: {POOL_KEPT_AT_PEAK:.0%} of "
                          f"train.cpu_cache_mib = {setup.cpu_pool // MIB}")]
    return [Part("CUDA context + allocator", CUDA_OVERHEAD_BYTES, note="constant: context, cuBLAS, allocator slack")]


def _activation_parts(setup: Setup) -> list[Part]:
    s, t, tokens = setup.shape, setup.dtypes, local_tokens(setup)
    saved = {name: tokens * size for name, size in layer_saved_per_token(setup).items()}
    scores_saved, scores_transient = attention_scores_bytes(setup)
    attention = saved["attention output"] + scores_saved
    layer_phases = ("attention", "mlp") if setup.checkpointing else ("attention", "mlp", "loss")
    top = "recomputed layer" if setup.checkpointing else "top layer"
    # final norm: fp32 input (+ normalised input when trained); its output and that output's gradient;
    # the (B * (L - 1), d) copy the chunked loss reshapes when B > 1
    copy = setup.chunked and setup.batch > 1
    final = tokens * s.hidden * (4 + 2 * t.stream + t.stream * norms_train(setup) + t.stream * copy)
    layer_gradients, head_gradient = _gradients_in_backward(setup)
    parts = [
        _held_part(setup, sum(saved.values()) + scores_saved),
        Part(f"{top}: attention block", saved["attention block"], phases=layer_phases, dynamic=True,
             note="norm, LoRA q/k/v branches, q/k/v"),
        _mlp_block_part(setup, saved["mlp block"], top, layer_phases[1:]),
        _mlp_transient_part(setup),
        Part("gradients in flight + dequantized weight", tokens * s.hidden * t.stream + dequantize_bytes(setup)
             + layer_gradients, phases=("attention", "mlp"), dynamic=True,
             note="(B, L, d) grad, one weight, layer grads"),
        Part("attention workspace", attention, phases=layer_phases, dynamic=True, note=_kernel_note(setup)),
        Part("attention backward scores", scores_transient, phases=("attention",), dynamic=True,
             note="eager / math kernels"),
        Part("logits + loss", final + loss_bytes(setup) + head_gradient, phases=("loss",), dynamic=True,
             note=f"chunks of {loss_positions(setup)} positions" if setup.chunked else "full (B, L, V) fp32 logits"),
    ]
    if setup.sequence_parallel > 1:
        parts.append(_all_to_all_part(setup))
    if setup.kernel == "eager-full" and setup.checkpointing:
        # create_causal_mask's (B, 1, L, L) additive mask, an input of every checkpointed layer
        parts.append(Part("causal mask (eager)", tokens * setup.seq_len * t.stream, phases=("attention", "mlp", "loss"),
                          dynamic=True, note="(B, 1, L, L) in the stream dtype"))
    return parts


def _mlp_tile_tokens(setup: Setup) -> int:
    """Tokens of one MLP tile (harness.tiled: tiles of d tokens of each sequence; DeepSpeed's backward
    cuts the B x L tokens into as many pieces), or all the rank's tokens without tiling."""
    if not setup.tiled_mlp:
        return local_tokens(setup)
    from harness.tiled import tiles_for

    tokens = local_tokens(setup)
    return -(-tokens // tiles_for(tokens // setup.batch, setup.shape.hidden))


def _mlp_block_part(setup: Setup, saved: int, top: str, phases: tuple[str, ...]) -> Part:
    """What the recomputed layer's MLP saves: everything (B, L, .) untiled; tiled, its input (B, L, d)
    and, in its backward, one tile's recomputed intermediates."""
    if not setup.tiled_mlp:
        return Part(f"{top}: MLP block", saved, phases=phases, dynamic=True,
                    note="LoRA o/gate/up/down, norm, 3 x (B, L, I)")
    s, t, tokens, tile = setup.shape, setup.dtypes, local_tokens(setup), _mlp_tile_tokens(setup)
    mlp_only = sum(linear_saves(setup).get(n, 0) for n in ("gate_proj", "up_proj", "gate_up_proj", "down_proj"))
    mlp_only += 3 * s.intermediate * t.linear
    held = (saved // tokens - mlp_only) * tokens + tokens * s.hidden * t.linear  # the rest of the block + x
    return Part(f"{top}: MLP block (tiled)", held + tile * mlp_only, phases=phases, dynamic=True,
                note=f"input (B, L, d) + one tile of {tile:,} tokens")


def _mlp_transient_part(setup: Setup) -> Part:
    """The MLP backward's gradients (fitted per token): one tile's when tiled, plus the (B, L, d) input
    gradient TiledMLP fills tile by tile."""
    tokens, tile = local_tokens(setup), _mlp_tile_tokens(setup)
    x_grad = tokens * setup.shape.hidden * setup.dtypes.linear if setup.tiled_mlp else 0
    note = "one tile's MLP backward gradients (fitted) + input gradient" if setup.tiled_mlp else \
        "MLP backward gradients (fitted)"
    return Part("backward transients", tile * layer_transient_per_token(setup) + x_grad, phases=("mlp",), dynamic=True,
                note=note)


def _all_to_all_part(setup: Setup) -> Part:
    """DeepSpeed's Ulysses exchanges: the contiguous send copy and the receive buffer of q, k, v (k, v with
    replicated heads when H_kv < N) on the way in, of the output on the way out, and of their gradients
    in backward: about two copies of one layer's q, k, v and output at a time."""
    s, t, tokens = setup.shape, setup.dtypes, local_tokens(setup)
    per_token = (2 * s.heads + 2 * kv_heads_held(setup)) * s.head_dim * t.attention  # q, out, k, v
    return Part("Ulysses all-to-all buffers", 2 * tokens * per_token, phases=("attention",), dynamic=True,
                note=f"sequence_parallel_size = {setup.sequence_parallel}: send + receive copies")


def _gradients_in_backward(setup: Setup) -> tuple[int, int]:
    """(at the top layer's backward, at the loss's backward): the gradients that exist then
    where the "gradients" line does not hold them all (no accumulation, no DeepSpeed buckets):
    the top layer's, and the output head's when it trains (full fine-tuning)."""
    if setup.grad_accum > 1 or setup.deepspeed is not None:
        return 0, 0
    s = setup.shape
    if setup.rank:
        layer = lora_params(s, setup.targets, setup.rank) // s.layers + 2 * s.hidden * setup.trainable_norms
        head = 0
    else:
        layer = sum(i * o for i, o in s.linears().values()) + 2 * s.hidden
        head = s.vocab * s.hidden
    return (layer + head) * setup.dtypes.lora, head * setup.dtypes.lora


def _held_part(setup: Setup, layer_saved: int) -> Part:
    """What the layers below the one in backward hold: their checkpointed inputs, or without
    checkpointing everything they saved. Layer 0 saves less: its input (the embedding output)
    does not require grad under non-reentrant checkpointing or none, so its input norm and its
    q/k/v dropout masks are not saved."""
    s, t, tokens = setup.shape, setup.dtypes, local_tokens(setup)
    if setup.checkpointing and setup.offload_activations:  # in CPU RAM; the layer in backward fetches its own
        one_layer = tokens * s.hidden * t.stream
        return Part("checkpointed hidden states", one_layer, phases=("attention", "mlp", "loss"), dynamic=True,
                    cpu_bytes=s.layers * one_layer, note=f"{s.layers} x (B, L, d) in pinned CPU RAM, one on the GPU")
    if setup.checkpointing:
        return Part("checkpointed hidden states", s.layers * tokens * s.hidden * t.stream,
                    phases=("attention", "mlp", "loss"), dynamic=True,
                    note=f"{s.layers} x (B, L, d), {8 * t.stream}-bit")
    layer_input = tokens * s.hidden * 4 * (t.stream == 4)  # an fp32 input is what the input norm saves
    masks = round(3 * s.hidden * t.mask) if setup.rank and setup.dropout > 0 else 0  # q/k/v dropout masks
    first_layer_saves_less = tokens * (s.hidden * 4 + 4 + masks)
    other_layers = (s.layers - 1) * (layer_saved + layer_input) - first_layer_saves_less * (s.layers > 1)
    return Part("stored activations (other layers)", other_layers + layer_input, phases=("attention", "mlp", "loss"),
                dynamic=True, note="no checkpointing: all they saved")


def _kernel_note(setup: Setup) -> str:
    group = f", G = {setup.group}" if setup.group else ""
    return {
        "fused": f"piecewise SDPA: its output{group}" if setup.group else "fused kernel: output + logsumexp",
        "math": f"SDPA math fallback: (B, H, L, {'G' if setup.group else 'L'}) scores{group}",
        "eager-full": "eager: (B, H, L, L) scores",
        "eager-s2": f"S2 eager kernel: dense (B, H, L, L) masked scores{group}",
    }[setup.kernel]


# --------------------------------------------------------------------------- the held-out evaluation

BATCH_IDS_PER_TOKEN = 4 * 8  # the collated int64 input_ids, labels, attention_mask and position_ids


def plan_evaluation(setup: Setup) -> EvalPlan:
    """The evaluation between two steps: what persists of training (weights, LoRA, optimizer states and
    master weights, the CUDA context or the CPU pool; not the gradients, which zero_grad frees, nor the
    step's temporaries) and one no-grad forward of a 1 x L held-out sample with full attention, L =
    setup.eval_len (the target under PoSE, whose training window is setup.seq_len)."""
    trainable = trainable_params(setup)
    persistent = _model_parts(setup) + _optimizer_parts(setup, trainable) + _overhead_parts(setup)
    parts = [dataclasses.replace(p, phases=EVAL_PHASES, dynamic=False) for p in persistent if p.phases == PHASES]
    length = setup.eval_len or setup.seq_len
    parts += _eval_forward_parts(dataclasses.replace(setup, batch=1, grad_accum=1, group=0, seq_len=length))
    return EvalPlan(length, parts, _peak_phase(parts, EVAL_PHASES))


def _eval_forward_parts(setup: Setup) -> list[Part]:
    """CausalLMLoss's forward of one (1, L) sample under torch.no_grad: each layer's tensors die with it.
    `setup` is the evaluation's: B = 1, full attention (group 0) through the kernel training runs (an
    S2 backend's full attention is its own kernel over one group: "eager-s2" stays S2's eager kernel)."""
    s, t, tokens = setup.shape, setup.dtypes, local_tokens(setup)
    q_dim, kv_dim = s.heads * s.head_dim, kv_heads_held(setup) * s.head_dim
    # q, k after RoPE and v, the kernel's output (+ logsumexp); then its scores or o_proj, whichever is larger
    attention = tokens * ((q_dim + 2 * kv_dim) * t.attention + attention_saved_per_token(setup)) + max(
        eval_scores_bytes(setup), tokens * _projection_peak(setup, "o_proj"))
    layers = ("eval attention", "eval mlp")
    parts = [
        Part("held-out batch", setup.seq_len * BATCH_IDS_PER_TOKEN, phases=EVAL_PHASES, dynamic=True,
             note="(1, L) int64 ids, labels, mask, positions"),
        # the embedding output (the decoder holds it to the end), the layer's input, RoPE's (1, L, D) cos and sin
        Part("eval: hidden states", tokens * (2 * s.hidden + 2 * s.head_dim) * t.stream, phases=layers, dynamic=True,
             note="embeddings, the layer's input, RoPE cos/sin"),
        Part("eval: attention", tokens * s.hidden * t.stream + attention, phases=("eval attention",), dynamic=True,
             note=_eval_kernel_note(setup)),
        Part("eval: MLP", tokens * (2 * s.hidden * t.stream + _mlp_forward_per_token(setup)), phases=("eval mlp",),
             dynamic=True, note="the residual sum, its norm, one layer's MLP forward"),
        Part("eval: logits + loss", tokens * s.hidden * t.stream + _eval_logits_bytes(setup), phases=("eval loss",),
             dynamic=True, note=f"chunks of {loss_positions(setup)} positions" if setup.chunked
             else "full (1, L, V) logits"),
    ]
    if setup.sequence_parallel > 1:
        parts.append(dataclasses.replace(_all_to_all_part(setup), phases=("eval attention",)))
    return parts


def eval_scores_bytes(setup: Setup) -> int:
    """One layer's (1, H, L, L) attention scores without gradients, 0 for fused kernels: 8 bytes a score
    in every dtype at the softmax (eager: the 16-bit scores, their fp32 softmax and its 16-bit cast, or
    fp32 scores and softmax; SDPA's math kernel computes 16-bit inputs in fp32: scores and softmax), plus
    the causal mask and GQA's repeated k and v."""
    if setup.kernel == "fused":
        return 0
    seq = setup.seq_len
    # causal mask bytes per (query, key): transformers' eager (1, 1, L, L) additive mask in the stream dtype;
    # S2's eager kernel, its allowed and ~allowed (1, L, L) bools; SDPA's math, an (L, L) bool and its fp32 copy
    mask = seq * seq * {"eager-full": setup.dtypes.stream, "eager-s2": 2, "math": 5}[setup.kernel]
    return 8 * (setup.shape.heads // setup.sequence_parallel) * seq * seq + mask + repeated_kv_bytes(setup)


def _projection_peak(setup: Setup, name: str) -> int:
    """Bytes per token of one linear layer's no-grad forward at its peak, beyond its input. peft's LoRA
    Linear4bit: result = base(x).clone() (two outputs at once), then result + lora_B(lora_A(x)) * scale,
    holding the result, lora_B's output and its scaled copy (the LoRA dtype, or the autocast dtype) and x
    cast for lora_A where its dtype differs; an unadapted layer, its output."""
    s, t = setup.shape, setup.dtypes
    fan_in, fan_out = s.linears()[name]
    if not (setup.rank and name in setup.targets):
        return fan_out * t.linear
    cast = fan_in * t.lora_input if t.lora_input != t.stream else 0
    return fan_out * max(2 * t.linear, t.linear + 2 * t.lora_input) + cast


def _mlp_forward_per_token(setup: Setup) -> int:
    """Bytes per token of the MLP's no-grad forward at its peak, beyond its input. down(act(gate(x)) * up(x))
    holds act(gate) while up runs, then act(gate), up and their product, then the product while down runs;
    a fused gate_up (Phi-3) its (1, L, 2I) output, then act(gate) and the product beside it."""
    inter = setup.shape.intermediate * setup.dtypes.linear  # one (1, L, I) tensor
    peak = functools.partial(_projection_peak, setup)
    if "gate_up_proj" in setup.shape.linears():
        return max(peak("gate_up_proj"), 4 * inter, 3 * inter + peak("down_proj"))
    return max(peak("gate_proj"), inter + peak("up_proj"), 3 * inter, inter + peak("down_proj"))


def _eval_logits_bytes(setup: Setup) -> int:
    """The head and cross-entropy without gradients (harness.loss._chunk_nll_sum, or the model's logits
    unchunked): fp32 logits and F.cross_entropy's log_softmax, 8 bytes a logit; unchunked, a 16-bit head's
    whole output stays beside its fp32 copy (+2)."""
    per_logit = 8 + (2 if head_outputs_16_bit(setup) and not setup.chunked else 0)
    return loss_positions(setup) * setup.shape.vocab * per_logit


def _eval_kernel_note(setup: Setup) -> str:
    if setup.kernel == "fused":
        return "full attention, fused kernel: q, k, v, output"
    return f"full attention, {setup.kernel} kernel: (1, H, L, L) scores, 8 bytes each"
