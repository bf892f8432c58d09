"""The runtime choices the planner mirrors: what a run of a recipe does on the planned device.

    setup = resolve_setup(recipe, model_shape(recipe), device="cuda", card=CARDS["v100-32gb"], seq_len=None)
    setup.precision, setup.autocast, setup.optimizer, setup.kernel, setup.dtypes.stream

Hardware-dependent choices (compute dtype, precision, optimizer, attention kernel, frozen weights
dtype, S2 group size) are asked of harness.policy, as training asks them. Autocast and the ZeRO
settings (optimizer offload included) are the engine's: its memory rule (rules.py) asks the
engine's own fact functions (accelerate_engine.autocast_dtype, deepspeed_engine.offloads_optimizer).
"""
from __future__ import annotations

from dataclasses import dataclass

from harness import policy
from harness.recipe import Recipe, sample_length

from .rules import Adaptation, QuantizationRule, Zero, rule_for
from .shapes import MIB, Card, ModelShape, PlanError

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GENERIC_GPU = policy.Device("cuda", (8, 0), bf16=True)  # a card the plan does not name: Ampere-class


@dataclass(frozen=True)
class Dtypes:
    """Element sizes (bytes) of the tensors that matter, as the code produces them."""

    base_weights: int  # unquantized weights (embeddings, norms, lm_head, or all with quantization none)
    lora: int  # trainable parameters (LoRA; every weight for full fine-tuning) and their gradients
    stream: int  # residual stream: embedding output, checkpointed hidden states
    linear: int  # outputs of the projections: MLP intermediates, q/k/v before attention
    attention: int  # q/k/v/out as the attention kernel saves them
    lora_input: int  # the dropout output saved by lora_A, and lora_A's output
    mask: float  # dropout mask per element: bool on CUDA (native_dropout); int64 drop positions on the CPU
    #              (harness.dropout), 8 p bytes


@dataclass(frozen=True)
class Setup:
    """Everything the byte counts need, resolved from a recipe for one device."""

    shape: ModelShape
    device: str  # cuda | cpu
    card: Card | None
    batch: int
    grad_accum: int
    seq_len: int
    group: int  # S2 group size, 0 for full attention
    quantization: QuantizationRule  # the quantization backend's memory rule
    double_quant: bool
    compute: int  # bytes of the quantization compute dtype (bitsandbytes dequantizes into it)
    precision: str  # fp32 | bf16 | fp16: the run's StepConfig.precision
    autocast: bool
    deepspeed: Zero | None
    optimizer: str  # adamw | paged_adamw_32bit | deepspeed_cpu_adam
    dtypes: Dtypes
    kernel: str  # fused | math | eager-full | eager-s2 (what actually runs)
    checkpointing: bool
    offload_activations: bool  # GPU: checkpointed hidden states wait in CPU RAM (save_on_cpu)
    chunked: bool
    targets: tuple[str, ...]  # adapted linear layers
    rank: int  # LoRA r; 0 = no adapter (full fine-tuning)
    dropout: float
    trainable_embeddings: bool
    trainable_norms: bool
    cards: int = 1  # ranks of the launch: ZeRO partitions over them
    sequence_parallel: int = 1  # engine.sequence_parallel_size: ranks sharing each sequence
    tiled_mlp: bool = False  # train.tiled_mlp
    cpu_pool: int = 0  # CPU: bytes the tensor pool may keep (train.cpu_cache_mib MiB; harness.cpu_memory)
    eval_len: int = 0  # tokens of the held-out evaluation's 1 x L sample: the target under PoSE; 0 = seq_len


def planned_device(device: str, card: Card | None) -> policy.Device:
    if device != "cuda":
        return policy.CPU
    return card.device if card is not None else GENERIC_GPU


def resolve_setup(recipe: Recipe, shape: ModelShape, *, device: str, card: Card | None, seq_len: int | None,
                  cards: int = 1, eval_len: int | None = None) -> Setup:
    """The choices a run of `recipe` makes on the planned device, asked of harness.policy and the backends' rules.

    seq_len: the training length (the recipe's resolved.seq_len when None: the window under PoSE). eval_len: the
    held-out evaluation's length; None: what the recipe reads per sample at that training length
    (harness.recipe.sample_length: the training length, or position.target_length under PoSE)."""
    cuda = device == "cuda"
    target = planned_device(device, card)
    seq = seq_len or recipe.resolved.seq_len
    if seq <= 0:
        raise PlanError("the sequence length is unknown: set data.max_seq_length or position.target_length, "
                        "or pass --seq-len")
    quantization = rule_for("quantization", recipe.quantization.name)
    adaptation = rule_for("adapter", recipe.adapter.name).adaptation(recipe.adapter)
    engine = rule_for("engine", recipe.engine.name)
    group = rule_for("attention", recipe.attention.name).group_size(seq, recipe.attention)
    precision = policy.precision(recipe.train.precision, recipe.quantization.compute_dtype, target)
    deepspeed = engine.zero(recipe)
    autocast = engine.autocasts(precision, target.type)
    dtypes = _dtypes(recipe, target, precision, quantization, adaptation, deepspeed is not None, autocast)
    return Setup(
        shape=shape, device=device, card=card, batch=recipe.train.micro_batch_size,
        grad_accum=recipe.train.grad_accum, seq_len=seq, group=group, quantization=quantization,
        double_quant=recipe.quantization.double_quant,
        compute=BYTES[policy.compute_dtype(recipe.quantization.compute_dtype, target)], precision=precision,
        autocast=autocast, deepspeed=deepspeed,
        optimizer=policy.optimizer(recipe.train.optimizer, target,
                                   offloaded=deepspeed is not None and deepspeed.offload_optimizer),
        dtypes=dtypes, kernel=_kernel(recipe, shape, target, dtypes, grouped=group > 0),
        checkpointing=recipe.train.gradient_checkpointing,
        offload_activations=cuda and recipe.train.offload_activations,
        chunked=recipe.train.chunked_loss, targets=adaptation.targets, rank=adaptation.rank,
        dropout=adaptation.dropout, trainable_embeddings=adaptation.trainable_embeddings,
        trainable_norms=adaptation.trainable_norms,
        cards=cards, sequence_parallel=_sequence_parallel(recipe, shape, cards), tiled_mlp=recipe.train.tiled_mlp,
        cpu_pool=recipe.train.cpu_cache_mib * MIB if not cuda and recipe.train.release_cpu_memory else 0,
        eval_len=eval_len or sample_length(recipe.layout.name, seq, recipe.position.target_length),
    )


def _sequence_parallel(recipe: Recipe, shape: ModelShape, cards: int) -> int:
    """engine.sequence_parallel_size, checked as a launch on `cards` cards would check it."""
    from harness.backends.sequence_parallel import SequenceParallelError, check_heads, check_world

    size = recipe.engine.sequence_parallel_size
    if size == 1:
        return 1
    try:
        check_world(cards, size)
        check_heads(shape.heads, shape.kv_heads, size)
    except SequenceParallelError as error:
        raise PlanError(f"{error} (planning {cards} card{'s' if cards > 1 else ''}: --gpus {cards})") from None
    return size


def local_tokens(setup: Setup) -> int:
    """Tokens one rank holds from the embeddings to the loss: B x L, or B x L/N (rounded up) under SP."""
    return setup.batch * -(-setup.seq_len // setup.sequence_parallel)


def _dtypes(recipe: Recipe, device: policy.Device, precision: str, quantization: QuantizationRule,
            adaptation: Adaptation, deepspeed: bool, autocast: bool) -> Dtypes:
    half = BYTES[precision]
    if deepspeed and half == 2:
        base = lora = stream = 2  # DeepSpeed casts every floating parameter to fp16/bf16, LoRA included
    else:
        loaded = BYTES[policy.frozen_weights_dtype(recipe.model.dtype, recipe.quantization.compute_dtype, device)]
        base = 4 if quantization.quantized and recipe.train.fp32_frozen_weights else loaded  # peft's k-bit cast
        lora = 4 if adaptation.rank else base  # peft keeps adapter weights in fp32
        extras = adaptation.trainable_embeddings or adaptation.trainable_norms
        stream = 4 if extras else base  # the embedding output; trainable embeddings / norms are fp32 (adapter.py)
    # Linear4bit returns its input's dtype (the norm output, = stream); nn.Linear under autocast the autocast dtype.
    linear = half if autocast and not quantization.quantized else stream
    return Dtypes(
        base_weights=base, lora=lora, stream=stream, linear=linear,
        attention=half if autocast else linear,  # sdpa / matmul under autocast save cast copies
        lora_input=half if autocast else lora,  # lora_A casts its input to its own dtype without autocast
        mask=1 if device.cuda else 8 * adaptation.dropout,
    )


def _kernel(recipe: Recipe, shape: ModelShape, device: policy.Device, dtypes: Dtypes, *, grouped: bool) -> str:
    """What the attention backend runs (harness.policy.attention_kernel and sdpa_math_fallback):
    fused | math | eager-full | eager-s2. The plan assumes flash-attn is installed where it can
    run; it costs what SDPA's fused kernels cost. Training data is unpadded and unpacked."""
    dtype = "fp32" if dtypes.attention == 4 else "bf16"  # the rules ask only "16-bit or not"
    kernel = policy.attention_kernel(recipe.attention.kernel, device, dtype, installed=True,
                                     softcapped=shape.softcapped)
    if kernel == "eager":
        return "eager-s2" if grouped else "eager-full"
    gqa = shape.kv_heads != shape.heads
    return "math" if kernel == "sdpa" and policy.sdpa_math_fallback(device, dtype, gqa=gqa, masked=False) else "fused"
