"""Memory planner: the peak GPU memory of a recipe, predicted from the model config alone.

    from harness.memory import plan
    result = plan(load_recipe("recipes/llama2_13b_12k.toml"), gpu_gib=32)
    result.peak_bytes, result.fits, result.max_seq_len, result.suggestions

No weights are loaded: the shape comes from a config.json (a local directory, the HF cache,
`--config`), from `model.init_config` for "random", or from `KNOWN_SHAPES`. Every byte count
below follows the code that runs (transformers' LLaMA layer, peft's LoRA Linear4bit forward,
bitsandbytes' MatMul4Bit, harness.backends.s2, harness.loss, the engines); the comments say
which tensor each term is. Shapes: B micro-batch, L sequence, d hidden, I intermediate,
H / H_kv query / KV heads of D dims, r LoRA rank, V vocabulary, N layers, G S2 group.

The peak is taken over four phases of a training step, each the sum of the parts live then:

    attention  backward through the top decoder layer's attention: every checkpointed hidden
               state, the recomputed layer's attention block and the attention's gradients
    mlp        backward through the top layer's MLP: all the recomputed layer saved, plus the
               MLP's backward transients (the usual peak)
    loss       backward of the output head + cross-entropy (one chunk at a time when chunked)
    step       the optimizer step: gradients, states and the optimizer's temporaries

Static parts (weights, LoRA, optimizer states, engine buffers, the CUDA context) are live in
all four. Validated on the CPU against torch's allocator (bench/plan_validation.py).

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
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from harness import policy
from harness.backends.s2 import PIECE_SHARE
from harness.errors import HarnessError
from harness.loss import chunk_tokens_for
from harness.recipe import Recipe, find_relative

GIB = 2**30
MIB = 2**20
# CUDA context + cuBLAS/cuDNN workspaces + caching-allocator slack, which torch's allocator
# counters never see: ~0.5 GiB of context on recent drivers plus ~0.25 GiB of slack.
CUDA_OVERHEAD_BYTES = int(0.75 * GIB)
POOL_KEPT_AT_PEAK = 0.35  # RSS the CPU tensor pool adds at a training step's peak, per byte of train.cpu_cache_mb:
# bench/train_step.py measured +0.07 GB (1k) and +0.10 GB (4k) over the same step without the pool, for 256 MiB
# Every projection of a decoder layer in any family (a shape's linears() holds those it has).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")
PHASES = ("attention", "mlp", "loss", "step")
SEARCH_STEP = 1024  # longest-sequence search: multiples of this many tokens
SEARCH_LIMIT = 16 * 1024 * SEARCH_STEP  # ... up to 16M tokens (sequence parallelism over many cards)


class PlanError(HarnessError, ValueError):
    """A plan that cannot be made; the message says what to pass instead."""


# --------------------------------------------------------------------------- cards

@dataclass(frozen=True)
class Card:
    name: str
    total_mib: int  # what nvidia-smi reports as total memory
    capability: tuple[int, int]  # CUDA compute capability: flash kernels need >= (8, 0)
    bf16: bool

    @property
    def total_bytes(self) -> int:
        return self.total_mib * MIB

    @property
    def device(self) -> policy.Device:
        """What harness.policy decides by: the planner makes the choices a run on this card makes."""
        return policy.Device("cuda", self.capability, self.bf16)


CARDS = {card.name: card for card in (
    Card("v100-32gb", 32768, (7, 0), bf16=False),
    Card("a100-40gb", 40960, (8, 0), bf16=True),
    Card("a100-80gb", 81920, (8, 0), bf16=True),
    Card("h100-80gb", 81559, (9, 0), bf16=True),
    Card("rtx4090-24gb", 24564, (8, 9), bf16=True),
)}


def card_named(name: str) -> Card:
    if name not in CARDS:
        raise PlanError(f"unknown card {name!r}; known cards: {', '.join(CARDS)} (or pass --gib N)")
    return CARDS[name]


def custom_card(gib: float) -> Card:
    """A card of `gib` GiB, assumed Ampere-class (flash kernels, bf16)."""
    if not (gib > 0 and math.isfinite(gib)):
        raise PlanError(f"--gib {gib:g}: the card memory must be a positive number of GiB")
    return Card(f"{gib:g} GiB", int(gib * 1024), (8, 0), bf16=True)


# --------------------------------------------------------------------------- model shape

# Families whose decoder layers fuse projections into one linear layer (transformers' module names).
FUSED_PROJECTIONS = {"phi3": ("qkv_proj", "gate_up_proj")}


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool  # lm_head shares the embedding matrix
    source: str = ""  # where the shape was read
    fused: tuple[str, ...] = ()  # fused projections: "qkv_proj" for q/k/v, "gate_up_proj" for gate/up (Phi-3)
    softcapped: bool = False  # attention logits soft-capped (Gemma-2): SDPA cannot run it (harness.policy)

    @classmethod
    def from_config(cls, config: dict, source: str) -> ModelShape:
        """From a config.json or init_config of any family transformers knows: its model_type's config
        class ("llama" when absent: LLaMA-7B's defaults) fills the keys the dict leaves out, and a
        multimodal config gives its text model's. Other families are read by LLaMA's key names."""
        config = _family_values(config, source)
        hidden = int(config.get("hidden_size", 4096))
        heads = int(config.get("num_attention_heads", 32))
        return cls(
            vocab=int(config.get("vocab_size", 32000)), hidden=hidden,
            intermediate=int(config.get("intermediate_size", 11008)),
            layers=int(config.get("num_hidden_layers", 32)), heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            tied=bool(config.get("tie_word_embeddings", False)), source=source,
            fused=FUSED_PROJECTIONS.get(config.get("model_type"), ()),
            softcapped=config.get("attn_logit_softcapping") is not None,
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer, by module name."""
        d, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        qkv = {"qkv_proj": (d, q + 2 * kv)} if "qkv_proj" in self.fused else {"q_proj": (d, q), "k_proj": (d, kv),
                                                                                "v_proj": (d, kv)}
        gate_up = {"gate_up_proj": (d, 2 * i)} if "gate_up_proj" in self.fused else {"gate_proj": (d, i),
                                                                                     "up_proj": (d, i)}
        return {**qkv, "o_proj": (q, d), **gate_up, "down_proj": (i, d)}


def _family_values(config: dict, source: str) -> dict:
    """The config's keys with its family's defaults (harness.base_model.config_from_dict)."""
    from transformers import CONFIG_MAPPING

    from harness.base_model import DEFAULT_MODEL_TYPE, config_from_dict

    if config.get("model_type", DEFAULT_MODEL_TYPE) not in CONFIG_MAPPING:
        return config  # a remote-code family: its own keys as they are
    try:
        return config_from_dict(config).get_text_config().to_dict()
    except (ValueError, TypeError) as error:
        raise PlanError(f"cannot read the model config {source}: {error}") from None


def _shape(vocab, hidden, intermediate, layers, heads, kv_heads, tied, **family):
    """A published config's shape keys; `family` adds model_type, head_dim and the like."""
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "tie_word_embeddings": tied, **family}


# From the published config.json files (hub ids, as recipes name them).
KNOWN_SHAPES = {
    "meta-llama/Llama-2-7b-hf": _shape(32000, 4096, 11008, 32, 32, 32, False),
    "meta-llama/Llama-2-13b-hf": _shape(32000, 5120, 13824, 40, 40, 40, False),
    "lmsys/vicuna-13b-v1.5": _shape(32000, 5120, 13824, 40, 40, 40, False),
    "HuggingFaceTB/SmolLM2-135M": _shape(49152, 576, 1536, 30, 9, 3, True),
    "HuggingFaceTB/SmolLM2-135M-Instruct": _shape(49152, 576, 1536, 30, 9, 3, True),
    "meta-llama/Meta-Llama-3-8B": _shape(128256, 4096, 14336, 32, 32, 8, False),
    "meta-llama/Llama-3.1-8B": _shape(128256, 4096, 14336, 32, 32, 8, False),
    "mistralai/Mistral-7B-v0.1": _shape(32000, 4096, 14336, 32, 32, 8, False, model_type="mistral"),
    "mistralai/Mistral-7B-v0.3": _shape(32768, 4096, 14336, 32, 32, 8, False, model_type="mistral"),
    "Qwen/Qwen2.5-7B": _shape(152064, 3584, 18944, 28, 28, 4, False, model_type="qwen2"),
    "Qwen/Qwen3-8B": _shape(151936, 4096, 12288, 36, 32, 8, False, model_type="qwen3", head_dim=128),
    "microsoft/Phi-3-mini-4k-instruct": _shape(32064, 3072, 8192, 32, 32, 32, False, model_type="phi3"),
}


def model_shape(recipe: Recipe, config_path: str | os.PathLike | None = None) -> ModelShape:
    """The model's shape without its weights: --config, init_config, a local or cached
    config.json, else the built-in table (by hub id, or by the file name of a GGUF)."""
    name = recipe.model.name_or_path
    if config_path:
        return ModelShape.from_config(_read_json(Path(config_path)), str(config_path))
    if name == "random":
        return ModelShape.from_config(recipe.model.init_config, "model.init_config")
    for candidate in _config_files(name):
        if candidate.is_file():
            return ModelShape.from_config(_read_json(candidate), str(candidate))
    # "pypi:.../SmolLM2-135M-Instruct.Q4_1.gguf" -> "smollm2-135m-instruct"
    basename = name.rstrip("/").split("/")[-1].split(".")[0].lower()
    key = next((k for k in KNOWN_SHAPES if k.lower() == name.lower() or k.lower().split("/")[-1] == basename), None)
    if key:
        return ModelShape.from_config(KNOWN_SHAPES[key], f"built-in shape of {key}")
    raise PlanError(
        f"model.name_or_path = {name!r}: no config.json found locally or in the HF cache, and it is not one "
        f"of the built-in shapes ({', '.join(KNOWN_SHAPES)}). Hub look-ups are not made: pass "
        f"--config path/to/config.json"
    )


def _config_files(name: str) -> list[Path]:
    """config.json of a local directory, of a GGUF already converted into the harness cache,
    or of a hub id in the HF cache."""
    from harness.base_model import cache_root

    files = [Path(name).expanduser() / "config.json"]
    if name.endswith(".gguf"):  # harness.base_model converts it to <cache>/gguf/<stem>-<key>/
        files += sorted((cache_root() / "gguf").glob(f"{Path(name).stem}-*/config.json"))
    elif "/" in name and not name.startswith((".", "/", "~", "pypi:")):
        home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
        hub = os.environ.get("HF_HUB_CACHE") or home / "hub"
        snapshots = Path(hub) / f"models--{name.replace('/', '--')}" / "snapshots"
        files += sorted(snapshots.glob("*/config.json"))
    return files


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise PlanError(f"cannot read the model config {path}: {error}") from None


# --------------------------------------------------------------------------- setup

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


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
class Zero:
    """The DeepSpeed ZeRO settings that cost memory (stage 0 = plain DeepSpeed fp16)."""

    stage: int = 0
    offload_optimizer: bool = False
    bucket: int = 0  # elements of each contiguous-gradient reduce bucket
    buckets: int = 0  # 2 with overlap_comm (double buffering), 1 without, 0 without contiguous gradients


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
    quant: str  # nf4 | int8 | none
    double_quant: bool
    compute: int  # bytes of the quantization compute dtype (bitsandbytes dequantizes into it)
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
    cpu_pool: int = 0  # CPU: bytes the tensor pool may keep (train.cpu_cache_mb; harness.cpu_memory)


GENERIC_GPU = policy.Device("cuda", (8, 0), bf16=True)  # a card the plan does not name: Ampere-class


def planned_device(device: str, card: Card | None) -> policy.Device:
    if device != "cuda":
        return policy.CPU
    return card.device if card is not None else GENERIC_GPU


def resolve_setup(recipe: Recipe, shape: ModelShape, *, device: str, card: Card | None, seq_len: int | None,
                  cards: int = 1) -> Setup:
    """The choices a run of `recipe` makes on the planned device, asked of harness.policy."""
    cuda = device == "cuda"
    target = planned_device(device, card)
    seq = seq_len or recipe.resolved.seq_len
    if seq <= 0:
        raise PlanError("the sequence length is unknown: set data.max_seq_length or position.target_length, "
                        "or pass --seq-len")
    compute_name = policy.compute_dtype(recipe.quantization.compute_dtype, target)
    precision = policy.precision(recipe.train.precision, recipe.quantization.compute_dtype, target)
    deepspeed = _zero(recipe) if recipe.engine.name == "deepspeed" else None
    autocast = cuda and deepspeed is None and precision in ("bf16", "fp16")
    dtypes = _dtypes(recipe, target, precision, deepspeed is not None, autocast)
    adapter = recipe.adapter
    return Setup(
        shape=shape, device=device, card=card, batch=recipe.train.micro_batch_size,
        grad_accum=recipe.train.grad_accum, seq_len=seq,
        group=_group_size(recipe, seq), quant=recipe.quantization.name, double_quant=recipe.quantization.double_quant,
        compute=BYTES[compute_name], autocast=autocast, deepspeed=deepspeed,
        optimizer=policy.optimizer(recipe.train.optimizer, target,
                                   offloaded=deepspeed is not None and deepspeed.offload_optimizer),
        dtypes=dtypes,
        kernel=_kernel(recipe, shape, target, dtypes), checkpointing=recipe.train.gradient_checkpointing,
        offload_activations=cuda and recipe.train.offload_activations,
        chunked=recipe.train.chunked_loss, targets=_targets(adapter.target_modules) if adapter.name == "lora" else (),
        rank=adapter.r if adapter.name == "lora" else 0, dropout=adapter.dropout,
        trainable_embeddings=adapter.name == "lora" and adapter.trainable_embeddings,
        trainable_norms=adapter.name == "lora" and adapter.trainable_norms,
        cards=cards, sequence_parallel=_sequence_parallel(recipe, shape, cards), tiled_mlp=recipe.train.tiled_mlp,
        cpu_pool=recipe.train.cpu_cache_mb * 2**20 if not cuda and recipe.train.release_cpu_memory else 0,
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


def _group_size(recipe: Recipe, seq_len: int) -> int:
    attention = recipe.attention
    return policy.s2_group_size(seq_len, attention.group_ratio, attention.group_size) if attention.name == "s2" else 0


def _zero(recipe: Recipe) -> Zero:
    path = find_relative(recipe.engine.deepspeed_config, recipe.source, key="engine.deepspeed_config")
    zero = _read_json(path).get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    contiguous = zero.get("contiguous_gradients", True)
    overlap = zero.get("overlap_comm", stage == 3)  # DeepSpeed's defaults
    return Zero(stage=stage, offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") == "cpu",
                bucket=int(float(zero.get("reduce_bucket_size", 5e8))) if stage in (1, 2) and contiguous else 0,
                buckets=(2 if overlap else 1) if stage in (1, 2) and contiguous else 0)


def _dtypes(recipe: Recipe, device: policy.Device, precision: str, deepspeed: bool, autocast: bool) -> Dtypes:
    quantized = recipe.quantization.name != "none"
    half = BYTES[precision]
    if deepspeed and half == 2:
        base = lora = stream = 2  # DeepSpeed casts every floating parameter to fp16/bf16, LoRA included
    else:
        loaded = BYTES[policy.frozen_weights_dtype(recipe.model.dtype, recipe.quantization.compute_dtype, device)]
        base = 4 if quantized and recipe.train.fp32_frozen_weights else loaded  # peft's k-bit preparation casts
        lora = 4 if recipe.adapter.name == "lora" else base  # peft keeps adapter weights in fp32
        extras = recipe.adapter.name == "lora" and (recipe.adapter.trainable_embeddings or recipe.adapter.trainable_norms)
        stream = 4 if extras else base  # the embedding output; trainable embeddings / norms are fp32 (adapter.py)
    # Linear4bit returns its input's dtype (the norm output, = stream); nn.Linear under autocast the autocast dtype.
    linear = half if autocast and not quantized else stream
    return Dtypes(
        base_weights=base, lora=lora, stream=stream, linear=linear,
        attention=half if autocast else linear,  # sdpa / matmul under autocast save cast copies
        lora_input=half if autocast else lora,  # lora_A casts its input to its own dtype without autocast
        mask=1 if device.cuda else 8 * recipe.adapter.dropout,
    )


def _kernel(recipe: Recipe, shape: ModelShape, device: policy.Device, dtypes: Dtypes) -> str:
    """What the attention backend runs (harness.policy.attention_kernel and sdpa_math_fallback):
    fused | math | eager-full | eager-s2. The plan assumes flash-attn is installed where it can
    run; it costs what SDPA's fused kernels cost. Training data is unpadded and unpacked."""
    dtype = "fp32" if dtypes.attention == 4 else "bf16"  # the rules ask only "16-bit or not"
    kernel = policy.attention_kernel(recipe.attention.kernel, device, dtype, installed=True, softcapped=shape.softcapped)
    if kernel == "eager":
        return "eager-s2" if recipe.attention.name == "s2" else "eager-full"
    gqa = shape.kv_heads != shape.heads
    return "math" if kernel == "sdpa" and policy.sdpa_math_fallback(device, dtype, gqa=gqa, masked=False) else "fused"


def _targets(modules: list[str]) -> tuple[str, ...]:
    if list(modules) == ["all-linear"]:
        return ALL_LINEAR
    return tuple(name for name in ALL_LINEAR if any(m == name or m.endswith(f".{name}") for m in modules))


# --------------------------------------------------------------------------- static memory

def quantized_linear_bytes(numel: int, quant: str, double_quant: bool, weight_bytes: int) -> int:
    """One linear weight as stored, with its bitsandbytes quantization state."""
    if quant == "none":
        return numel * weight_bytes
    if quant == "int8":
        return numel  # int8 CB (+ an fp32 scale per row, negligible)
    blocks = math.ceil(numel / 64)  # NF4: one absmax per 64 weights
    packed = math.ceil(numel / 2)  # two 4-bit codes per byte
    if not double_quant:
        return packed + 4 * blocks + 16 * 4  # fp32 absmax + the 16-entry fp32 NF4 code
    # double quantization: uint8 absmax, one fp32 absmax per 256 of them, a 256-entry fp32 code,
    # an fp32 offset, and the 16-entry NF4 code (each a separate tensor per layer)
    return packed + blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4 + 16 * 4


def weight_bytes(setup: Setup) -> tuple[int, int]:
    """(quantized linear layers, unquantized parts: embeddings, norms, lm_head)."""
    shape, dtypes = setup.shape, setup.dtypes
    linear = sum(quantized_linear_bytes(i * o, setup.quant, setup.double_quant, dtypes.base_weights)
                 for i, o in shape.linears().values()) * shape.layers
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
    q_dim, kv_dim = s.heads * s.head_dim, _kv_heads_held(setup) * s.head_dim
    linears = _linear_saves(setup)
    # RMSNorm saves its fp32 input (hidden.to(float32)) and rsqrt (B, L, 1): for the input norm
    # that is the layer input itself when the stream is fp32 (no new memory), else a copy; a
    # trained norm weight also saves the normalised input it multiplies.
    normalised = s.hidden * t.stream if _norms_train(setup) else 0
    input_norm = (s.hidden * 4 if t.stream != 4 else 0) + 4 + normalised
    post_norm = s.hidden * 4 + 4 + normalised  # the residual sum h, or its fp32 copy
    return {
        "attention block": input_norm + sum(linears.get(n, 0) for n in ("q_proj", "k_proj", "v_proj", "qkv_proj"))
        + (q_dim + 2 * kv_dim) * t.attention,  # q, k after RoPE and v, saved by the kernel
        "mlp block": post_norm + sum(linears.get(n, 0) for n in ("o_proj", "gate_proj", "up_proj", "gate_up_proj",
                                                                 "down_proj"))
        + 3 * s.intermediate * t.linear,  # gate out (SiLU input), act(gate) and up (a fused gate_up: its 2I output + act)
        "attention output": _attention_saved_per_token(setup),
    }


def _kv_heads_held(setup: Setup) -> int:
    """KV heads per local token that attention holds: H_kv, or N under SP with H_kv < N (each rank keeps
    one KV head of the whole sequence: N x its share of the tokens)."""
    return max(setup.shape.kv_heads, setup.sequence_parallel) if setup.sequence_parallel > 1 else setup.shape.kv_heads


def _norms_train(setup: Setup) -> bool:
    return setup.rank == 0 or setup.trainable_norms


# Linear layers that read the same input tensor (the norm outputs, the attention output, the product).
_SHARED_INPUTS = (("q_proj", "k_proj", "v_proj", "qkv_proj"), ("o_proj",), ("gate_proj", "up_proj", "gate_up_proj"),
                  ("down_proj",))


def _linear_saves(setup: Setup) -> dict[str, int]:
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


def _attention_saved_per_token(setup: Setup) -> int:
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
        piece_queries = max(b * heads * seq // PIECE_SHARE, b * max(1, heads // _kv_heads_held(setup)) * setup.group)
        return 0, 3 * 4 * piece_queries * setup.group
    scores = b * (s.heads // setup.sequence_parallel) * seq * seq
    per_score = 4 + (setup.dtypes.attention if setup.dtypes.attention != 4 else 0)
    saved = scores * per_score
    if setup.kernel == "eager-s2":
        saved += 2 * b * seq * seq  # the ~allowed masks saved by masked_fill, one per half
    if setup.kernel.startswith("eager") and s.kv_heads != s.heads:
        saved += 2 * b * seq * (s.heads - s.kv_heads) * s.head_dim * setup.dtypes.attention  # repeated k, v
    share = _unshifted_share(s) if setup.kernel == "eager-s2" else 1.0
    return saved, int(2 * 4 * scores * share)


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
    if setup.quant == "none":
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
        sixteen_bit_output = setup.autocast or setup.dtypes.base_weights == 2
        return loss_positions(setup) * setup.shape.vocab * (6 if sixteen_bit_output else 4)
    return loss_positions(setup) * setup.shape.vocab * 12


def head_is_frozen(setup: Setup) -> bool:
    """LoRA without trained embeddings, and no ZeRO-3 partition of the head (harness.loss._frozen_and_whole)."""
    zero3 = setup.deepspeed is not None and setup.deepspeed.stage == 3
    return setup.rank > 0 and not setup.trainable_embeddings and not zero3


def loss_positions(setup: Setup) -> int:
    """Positions whose logits exist at once: one chunk (harness.loss.chunk_tokens_for, ~128 MiB
    of fp32 logits) when chunked, else all B * (L - 1)."""
    positions = setup.batch * (setup.seq_len - 1) if setup.sequence_parallel == 1 else local_tokens(setup)
    return min(chunk_tokens_for(setup.shape.vocab), positions) if setup.chunked else positions


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Part:
    """One line of the breakdown: bytes on the device, the phases it is live in, host RAM."""

    name: str
    bytes: int
    phases: tuple[str, ...] = PHASES
    cpu_bytes: int = 0
    note: str = ""
    dynamic: bool = False  # allocated by the training step (not by building the model)


@dataclass
class MemoryPlan:
    recipe: str
    device: str
    card: str | None
    capacity_bytes: int | None
    shape: ModelShape
    batch: int
    seq_len: int
    trainable_params: int
    parts: list[Part]
    peak_phase: str
    fits: bool | None = None
    max_seq_len: int | None = None
    suggestions: list[str] = field(default_factory=list)
    cards: int = 1
    sequence_parallel: int = 1
    tiled_mlp: bool = False

    def at_peak(self, part: Part) -> int:
        return part.bytes if self.peak_phase in part.phases else 0

    @property
    def peak_bytes(self) -> int:
        """Predicted peak device memory, CUDA overhead included."""
        return sum(self.at_peak(part) for part in self.parts)

    @property
    def dynamic_bytes(self) -> int:
        """What one training step adds at its peak to a built model: activations, attention,
        loss, gradients, optimizer states and temporaries (what the CPU validation measures)."""
        return sum(self.at_peak(part) for part in self.parts if part.dynamic)

    @property
    def allocated_bytes(self) -> int:
        """The peak as torch.cuda.max_memory_allocated would see it: without the CUDA
        overhead and without paged (unified-memory) optimizer states."""
        hidden = ("CUDA context + allocator", "optimizer states (paged)")
        return sum(self.at_peak(part) for part in self.parts if part.name not in hidden)

    @property
    def cpu_bytes(self) -> int:
        return sum(part.cpu_bytes for part in self.parts)

    def part_bytes(self, name: str) -> int:
        return sum(p.bytes for p in self.parts if p.name == name)

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe, "device": self.device, "card": self.card, "capacity_bytes": self.capacity_bytes,
            "model": dataclasses.asdict(self.shape), "micro_batch": self.batch, "seq_len": self.seq_len,
            "trainable_params": self.trainable_params,
            "peak_phase": self.peak_phase, "peak_bytes": self.peak_bytes, "allocated_bytes": self.allocated_bytes,
            "dynamic_bytes": self.dynamic_bytes, "cpu_bytes": self.cpu_bytes, "fits": self.fits,
            "max_seq_len": self.max_seq_len, "suggestions": self.suggestions, "cards": self.cards,
            "sequence_parallel_size": self.sequence_parallel, "tiled_mlp": self.tiled_mlp,
            "breakdown": [{"name": p.name, "bytes": p.bytes, "at_peak": self.at_peak(p), "phases": list(p.phases),
                           "cpu_bytes": p.cpu_bytes, "note": p.note} for p in self.parts],
        }


def plan(recipe: Recipe, *, gpu_gib: float | None = None, seq_len: int | None = None, device: str = "cuda",
         card: str | None = None, config: str | os.PathLike | None = None, cards: int = 1) -> MemoryPlan:
    """Predict the peak memory of one training step of `recipe`.

    gpu_gib or card (a CARDS name) gives the capacity: then `fits`, `max_seq_len` and
    `suggestions` are filled. seq_len overrides the recipe's sequence length; device "cpu"
    plans a CPU run (fp32, no CUDA context); config is a config.json
    for models whose shape is not otherwise known. cards: the ranks of the launch (one card's memory is
    planned; ZeRO partitions and engine.sequence_parallel_size work over them).
    """
    if device not in ("cuda", "cpu"):
        raise PlanError(f"device must be 'cuda' or 'cpu', got {device!r}")
    target = card_named(card) if card else custom_card(gpu_gib) if gpu_gib is not None else None
    shape = model_shape(recipe, config)
    if cards < 1:
        raise PlanError(f"--gpus {cards}: the number of cards must be at least 1")
    result = _plan_setup(resolve_setup(recipe, shape, device=device, card=target, seq_len=seq_len, cards=cards),
                         recipe)
    if target is not None:
        result.fits = result.peak_bytes <= target.total_bytes
        result.max_seq_len = longest_fitting(recipe, shape, device, target, cards)
        if not result.fits:
            result.suggestions = suggestions(recipe, shape, device, target, result, cards)
    return result


def _plan_setup(setup: Setup, recipe: Recipe) -> MemoryPlan:
    parts = _static_parts(setup) + _activation_parts(setup)
    peaks = {phase: sum(p.bytes for p in parts if phase in p.phases) for phase in PHASES}
    card = setup.card
    return MemoryPlan(
        recipe=recipe.source, device=setup.device, card=card.name if card else None,
        capacity_bytes=card.total_bytes if card else None, shape=setup.shape, batch=setup.batch,
        seq_len=setup.seq_len, trainable_params=trainable_params(setup), parts=parts,
        peak_phase=max(peaks, key=peaks.get), cards=setup.cards, sequence_parallel=setup.sequence_parallel,
        tiled_mlp=setup.tiled_mlp,
    )


def _static_parts(setup: Setup) -> list[Part]:
    quantized, unquantized = weight_bytes(setup)
    trainable = trainable_params(setup)
    dtypes = setup.dtypes
    kind = {"nf4": "NF4", "int8": "int8", "none": f"{8 * dtypes.base_weights}-bit"}[setup.quant]
    double = " + double-quant absmax" if setup.quant == "nf4" and setup.double_quant else ""
    lora = f"{trainable:,} trainable, {8 * dtypes.lora}-bit" if setup.rank else "full fine-tuning: the weights train"
    parts = [
        Part("weights (quantized linears)" if setup.quant != "none" else "weights (linears)", quantized,
             note=kind + double),
        Part("weights (embeddings, norms, head)", unquantized, note=f"{8 * dtypes.base_weights}-bit"),
        Part("LoRA parameters", trainable * dtypes.lora if setup.rank else 0, note=lora),
    ]
    return parts + _gradient_parts(setup, trainable) + _optimizer_parts(setup, trainable) + _overhead_parts(setup)


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
                          f"train.cpu_cache_mb = {setup.cpu_pool // 2**20}")]
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
    final = tokens * s.hidden * (4 + 2 * t.stream + t.stream * _norms_train(setup) + t.stream * copy)
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
    mlp_only = sum(_linear_saves(setup).get(n, 0) for n in ("gate_proj", "up_proj", "gate_up_proj", "down_proj"))
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
    per_token = (2 * s.heads + 2 * _kv_heads_held(setup)) * s.head_dim * t.attention  # q, out, k, v
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


# --------------------------------------------------------------------------- verdict

def _replan(recipe: Recipe, shape: ModelShape, device: str, card: Card, seq_len: int | None = None,
            cards: int = 1) -> MemoryPlan:
    return _plan_setup(resolve_setup(recipe, shape, device=device, card=card, seq_len=seq_len, cards=cards), recipe)


def longest_fitting(recipe: Recipe, shape: ModelShape, device: str, card: Card, cards: int = 1) -> int:
    """The longest multiple of 1024 tokens that fits (0 if not even 1024); memory grows with L."""
    def fits(k: int) -> bool:
        return _replan(recipe, shape, device, card, k * SEARCH_STEP, cards).peak_bytes <= card.total_bytes

    if not fits(1):
        return 0
    low, high = 1, 2
    while high * SEARCH_STEP <= SEARCH_LIMIT and fits(high):
        low, high = high, high * 2
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low * SEARCH_STEP


def _with(recipe: Recipe, table: str, **values) -> Recipe:
    return dataclasses.replace(recipe, **{table: dataclasses.replace(getattr(recipe, table), **values)})


def suggestions(recipe: Recipe, shape: ModelShape, device: str, card: Card, current: MemoryPlan,
                cards: int = 1) -> list[str]:
    """Ordered changes, each applied on top of the previous ones that helped, until it fits."""
    changes = [
        ("enable gradient checkpointing (train.gradient_checkpointing=true)",
         lambda r: _with(r, "train", gradient_checkpointing=True)),
        ("chunk the loss (train.chunked_loss=true)", lambda r: _with(r, "train", chunked_loss=True)),
        ("use a fused attention kernel (attention.kernel=\"sdpa\")", lambda r: _with(r, "attention", kernel="sdpa")),
        ("train with S2 attention (attention.name=\"s2\")", lambda r: _with(r, "attention", name="s2")),
        ("offload the optimizer with ZeRO (engine.name=\"deepspeed\", "
         "engine.deepspeed_config=\"launch/deepspeed/zero2_offload.json\")", _zero_offload),
        (f"micro-batch 1 (train.micro_batch_size=1, train.grad_accum="
         f"{recipe.train.micro_batch_size * recipe.train.grad_accum})",
         lambda r: _with(r, "train", micro_batch_size=1, grad_accum=r.train.micro_batch_size * r.train.grad_accum)),
        ("tile the MLP (train.tiled_mlp=true)", lambda r: _with(r, "train", tiled_mlp=True)),
    ]
    out, best, peak = [], recipe, current.peak_bytes
    for text, change in changes:
        candidate = change(best)
        result = _replan(candidate, shape, device, card, current.seq_len, cards)
        if result.peak_bytes >= peak:
            continue  # already so, or no help for this recipe
        best, peak = candidate, result.peak_bytes
        out.append(f"{text}: {_gib(peak)}")
        if peak <= card.total_bytes:
            return out
    if device == "cuda" and best.train.gradient_checkpointing and not best.train.offload_activations:
        best = _with(best, "train", offload_activations=True)
        peak = _replan(best, shape, device, card, current.seq_len, cards).peak_bytes
        out.append(f"offload the checkpointed hidden states to CPU RAM (train.offload_activations=true): {_gib(peak)}")
        if peak <= card.total_bytes:
            return out
    best, peak, text = _sequence_parallel_suggestion(best, shape, device, card, current.seq_len, cards, peak)
    if text:
        out.append(text)
        if peak <= card.total_bytes:
            return out
    longest = longest_fitting(best, shape, device, card, cards)
    out.append(f"train on shorter sequences: up to {longest} tokens fit" if longest
               else "no sequence length fits: use a card with more memory")
    return out


def _sequence_parallel_suggestion(recipe: Recipe, shape: ModelShape, device: str, card: Card, seq_len: int,
                                  cards: int, peak: int) -> tuple[Recipe, int, str]:
    """The smallest engine.sequence_parallel_size the cards and heads allow that fits, else the largest
    (when it helps): (recipe, peak, suggestion) or (recipe, peak, "") when none applies."""
    from harness.backends.sequence_parallel import SequenceParallelError, check_heads

    sizes = [n for n in range(recipe.engine.sequence_parallel_size + 1, cards + 1) if cards % n == 0]
    found = None
    for size in sizes:
        try:
            check_heads(shape.heads, shape.kv_heads, size)
        except SequenceParallelError:
            continue
        candidate = _with(_zero_offload(recipe) if recipe.engine.name != "deepspeed" else recipe, "engine",
                          sequence_parallel_size=size)
        found = candidate, _replan(candidate, shape, device, card, seq_len, cards).peak_bytes, size
        if found[1] <= card.total_bytes:
            break
    if found is None or found[1] >= peak:
        return recipe, peak, ""
    candidate, new_peak, size = found
    return candidate, new_peak, (f"shard each sequence over {size} cards (engine.sequence_parallel_size={size}, "
                                 f"deepspeed --num_gpus {cards}): {_gib(new_peak)}")


def _zero_offload(recipe: Recipe) -> Recipe:
    root = Path(__file__).resolve().parents[2]
    return _with(_with(recipe, "engine", name="deepspeed",
                       deepspeed_config=str(root / "launch" / "deepspeed" / "zero2_offload.json")),
                 "train", optimizer="auto")


def _gib(size: int) -> str:
    return f"{size / GIB:.2f} GiB"


# --------------------------------------------------------------------------- rendering

def render(result: MemoryPlan, console) -> None:
    """The breakdown as a rich table, then the verdict."""
    from rich.table import Table

    s = result.shape
    title = (f"{Path(result.recipe).name or 'recipe'}: {s.layers} layers, d={s.hidden}, V={s.vocab}; "
             f"B={result.batch}, L={result.seq_len}{_parallel_title(result)}, peak in the {result.peak_phase} phase")
    table = Table(title=title, show_footer=True)
    table.add_column("component", footer="peak")
    table.add_column("at peak", justify="right", footer=_gib(result.peak_bytes))
    table.add_column("own size", justify="right")
    table.add_column("CPU RAM", justify="right", footer=_gib(result.cpu_bytes) if result.cpu_bytes else "")
    table.add_column("note")
    for part in result.parts:
        table.add_row(part.name, _size(result.at_peak(part)), _size(part.bytes),
                      _size(part.cpu_bytes) if part.cpu_bytes else "", part.note)
    console.print(table)
    console.print(f"model shape from {s.source}; torch allocator peak (no CUDA overhead, no paged states): "
                  f"{_gib(result.allocated_bytes)}", soft_wrap=True)
    if result.fits is None:
        return
    verdict = "[green]fits[/]" if result.fits else "[red]does not fit[/]"
    console.print(f"Verdict: {verdict} on {result.card} ({_gib(result.capacity_bytes)}): "
                  f"predicted peak {_gib(result.peak_bytes)}. Longest sequence that fits: "
                  f"{result.max_seq_len or 'none'} tokens (multiples of {SEARCH_STEP}).", soft_wrap=True)
    for number, text in enumerate(result.suggestions, 1):
        console.print(f"  {number}. {text}", soft_wrap=True)


def _parallel_title(result: MemoryPlan) -> str:
    """", one of 8 cards, L/4 per card (sequence_parallel_size = 4), tiled MLP" as it applies."""
    text = f", one of {result.cards} cards" if result.cards > 1 else ""
    if result.sequence_parallel > 1:
        text += f", L/{result.sequence_parallel} per card (sequence_parallel_size = {result.sequence_parallel})"
    return text + (", tiled MLP" if result.tiled_mlp else "")


def _size(size: int) -> str:
    if size >= GIB / 4:
        return f"{size / GIB:.2f} GiB"
    return f"{size / MIB:.1f} MiB" if size >= MIB else f"{size / 1024:.1f} KiB"
