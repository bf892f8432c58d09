"""Every choice that depends on the hardware, made once, as pure functions of a Device.

    device = Device.current()                       # training, eval and convert: this machine
    device = CARDS["v100-32gb"].device              # the memory planner: a described card
    compute_dtype("auto", device)                   # -> "fp16" on a V100

Training, the memory planner, evaluation and convert all ask these functions, so a plan for
a V100 makes exactly the choices a run on a V100 makes. Dtypes are names: "bf16", "fp16",
"fp32". The rules, with their reasons:

    compute dtype       "auto": bf16 where the card has it, fp16 on older cards (V100, T4),
                        fp32 on the CPU (no native bf16 on most CPUs: emulated, many times slower)
    precision           "auto": the compute dtype on a GPU, fp32 on the CPU
    frozen weights      model.dtype; "auto": the compute dtype on a GPU, fp32 on the CPU
    optimizer           "auto": DeepSpeed's CPU Adam when ZeRO offloads the optimizer, paged
                        AdamW on a GPU, AdamW on the CPU (paged optimizers page GPU memory)
    S2 group size       attention.group_size, else group_ratio x L rounded down to even, at
                        least 2 and at most L
    rope factor         position.factor, else ceil(target length / original window) (the paper)
    world size          WORLD_SIZE as the launcher set it (torchrun, accelerate, deepspeed), else 1
    data replicas       the world size / engine.sequence_parallel_size: each sequence-parallel group
                        of N ranks trains on one micro-batch (data_world_size; what effective batch
                        and tokens per step count, at load and in training alike)
    attention kernel    "auto": flash-attn on CUDA cards of compute capability 8.0 (Ampere) or
                        newer, in 16-bit, when installed; SDPA otherwise (eager for soft-capped
                        attention, which SDPA cannot compute). flash-attn has no kernels below
                        sm80: on a V100 or T4 it would crash.
    S2 piece size       how much of the query one SDPA call of S2 holds: the whole query on a GPU's
                        fused kernels, 1/PIECE_SHARE of it on the math fallback and the CPU (at
                        least CPU_PIECE_FLOOR elements there); see piece_budget
    eval cadence        train.eval_every = -1: every N steps, N chosen so that the held-out
                        evaluations cost about EVAL_SHARE (5%) of the training time (eval_cadence);
                        a run shorter than N scores only as many samples at its last step as
                        that share buys, at least one (eval_samples_within)
    SDPA math fallback  torch's fused SDPA kernels take grouped-query attention (enable_gqa)
                        only in flash form: 16-bit on Ampere or newer. Unmasked GQA elsewhere on
                        CUDA runs the math kernel, which materialises the scores.
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass

from harness.errors import HarnessError

FLASH_CAPABILITY = (8, 0)  # flash-attn 2 and SDPA's flash kernel need Ampere or newer
HALF = ("bf16", "fp16")
KERNELS = ("auto", "sdpa", "flash", "eager")  # attention.kernel
OPTIMIZERS = ("auto", "adamw", "paged_adamw_32bit", "deepspeed_cpu_adam")  # train.optimizer
S2_GROUP_RATIO = 0.25  # attention.group_ratio's default: S2's group as a share of the sequence (the paper's)


class PolicyError(HarnessError, ValueError):
    """A setting this device cannot honour; the message names the key and what to use."""


@dataclass(frozen=True)
class Device:
    """What the choices depend on: the kind of device, its CUDA capability and bf16 support."""

    type: str = "cpu"  # cuda | cpu
    capability: tuple[int, int] = (0, 0)  # CUDA compute capability; (0, 0) on the CPU
    bf16: bool = False

    @property
    def cuda(self) -> bool:
        return self.type == "cuda"

    @classmethod
    def current(cls) -> Device:
        """This process's device: the current CUDA device, else the CPU."""
        import torch

        return cls.of(torch.device("cuda", torch.cuda.current_device())) if torch.cuda.is_available() else CPU


    @classmethod
    def of(cls, device) -> Device:
        """The Device of a torch.device (a tensor's), e.g. `Device.of(query.device)`."""
        import torch

        if device.type != "cuda":
            return CPU
        return cls("cuda", tuple(torch.cuda.get_device_capability(device)), bool(torch.cuda.is_bf16_supported()))


CPU = Device()
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> "bf16" (the names these functions use)."""
    return DTYPE_NAMES.get(str(dtype).removeprefix("torch."), str(dtype))


def compute_dtype(name: str, device: Device) -> str:
    """The dtype bitsandbytes dequantizes into and the projections compute in."""
    if name != "auto":
        return name
    if not device.cuda:
        return "fp32"
    return "bf16" if device.bf16 else "fp16"


def precision(name: str, quant_compute: str, device: Device) -> str:
    """train.precision: the autocast / DeepSpeed dtype."""
    if name != "auto":
        return name
    if not device.cuda:
        return "fp32"
    if quant_compute == "bf16" and not device.bf16:
        return "fp16"
    return compute_dtype(quant_compute, device)


def frozen_weights_dtype(model_dtype: str, quant_compute: str, device: Device) -> str:
    """model.dtype: what the unquantized (frozen) weights load in."""
    if model_dtype != "auto":
        return model_dtype
    if not device.cuda:
        return "fp32"
    return compute_dtype(quant_compute, device)


def optimizer(name: str, device: Device, *, offloaded: bool) -> str:
    """train.optimizer: adamw | paged_adamw_32bit | deepspeed_cpu_adam."""
    if offloaded:
        return "deepspeed_cpu_adam"  # an offloaded optimizer steps on the CPU: DeepSpeed's CPU Adam
    if name == "auto":
        name = "paged_adamw_32bit" if device.cuda else "adamw"
    if name == "paged_adamw_32bit" and not device.cuda:
        return "adamw"  # the same math; nothing to page on the CPU
    return name


def s2_group_size(seq_len: int, group_ratio: float = S2_GROUP_RATIO, group_size: int = 0) -> int:
    """S2's group size G for a sequence of `seq_len` tokens (attention.group_size / group_ratio).

    A fixed group_size must be even and >= 2. A batch shorter than it (short documents in
    truncate mode) gets groups of its own length, rounded down to even: S2 needs G <= L."""
    check_s2_group(group_ratio, group_size)
    if group_size == 0:
        group_size = int(seq_len * group_ratio) // 2 * 2
    return max(2, min(group_size, seq_len // 2 * 2))


def check_s2_group(group_ratio: float, group_size: int) -> None:
    """attention.group_size is 0 or even and >= 2 (shifted heads move by half a group); else
    attention.group_ratio is a share in (0, 1]."""
    if group_size < 0 or group_size % 2 or group_size == 1:
        raise PolicyError(f"attention.group_size = {group_size} must be even and >= 2 (shifted heads move by half "
                          f"a group), or 0 to use attention.group_ratio")
    if not 0 < group_ratio <= 1:
        raise PolicyError(f"attention.group_ratio = {group_ratio} must be in (0, 1]; the paper uses {S2_GROUP_RATIO:g}")


def interpolation_factor(target_length: int, original: int, factor: float = 0.0) -> float:
    """The rope factor: `factor` when given, else ceil(target_length / original) as in the paper;
    0.0 when neither length is known (the recipe checks target_length, the position backends refuse 0)."""
    if factor:
        return float(factor)
    if target_length <= 0 or original <= 0:
        return 0.0
    return float(math.ceil(target_length / original))


def launched_world_size() -> int:
    """The processes a launcher started (WORLD_SIZE from torchrun, accelerate launch, deepspeed); 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def data_world_size(world_size: int, sequence_parallel_size: int = 1) -> int:
    """The data-parallel replicas of `world_size` ranks: under sequence parallelism each group of
    sequence_parallel_size ranks trains on one micro-batch (the engines' data_world_size; recipe.resolve
    at load, from the launched world). At least 1: a launch that the size does not divide is refused
    when the engine starts (harness.backends.sequence_parallel.check_world)."""
    return max(1, world_size // max(1, sequence_parallel_size))


# How much of the query one SDPA piece holds. Small pieces bound the backward's transients (a few
# piece-sized tensors: the recomputed output, the piece's gradients, the kernel's buffers, and on
# SDPA's math fallback the piece's (queries, G) scores); each piece costs kernel calls.
# - CPU: 1/PIECE_SHARE of the query (one KV head x one group at the least), but CPU_PIECE_FLOOR
#   elements even so: a busy CPU makes many small threaded calls slow (a 512-token LLaMA-shaped
#   query on 2 loaded cores: 50 s of backward in 128 pieces, 0.6 s in one).
# - GPU, fused kernels: the whole query (one piece per half and segment). The transients are a
#   few (B, L, H/2, D) tensors of one layer; 1/128 pieces made S2 24x slower than full attention
#   at 8k on an H100 (launch-bound), whole ones 3x faster.
# - GPU, math fallback (GQA before Ampere, or fp32 GQA): 1/PIECE_SHARE, as the scores are per piece.
PIECE_SHARE = 128
CPU_PIECE_FLOOR = 2**20


def piece_budget(query_elements: int, device_type: str, math_fallback: bool) -> int:
    """The most query elements one SDPA piece of S2 may hold (harness.backends.s2 cuts its pieces to it)."""
    share = query_elements // PIECE_SHARE
    if device_type == "cpu":
        return max(share, CPU_PIECE_FLOOR)
    return share if math_fallback else query_elements


def flash_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_usable(device: Device, dtype: str, installed: bool) -> bool:
    """flash-attn can run here: installed, CUDA, sm80 or newer, 16-bit tensors."""
    return installed and device.cuda and device.capability >= FLASH_CAPABILITY and dtype in HALF


def attention_kernel(name: str, device: Device, dtype: str, *, installed: bool, softcapped: bool = False) -> str:
    """attention.kernel: "auto" -> "flash" where flash_usable, else "sdpa" ("eager" for soft-capped
    attention, Gemma-2's, which SDPA cannot compute); an explicit kernel that cannot run is refused."""
    fallback = "eager" if softcapped else "sdpa"
    if name == "auto":
        return "flash" if flash_usable(device, dtype, installed) else fallback
    if name == "flash" and not flash_usable(device, dtype, installed):
        raise PolicyError(f"attention.kernel = \"flash\" cannot run here: {_flash_missing(device, dtype, installed)}. "
                          f"Use attention.kernel = \"{fallback}\" (or \"auto\")")
    if name == "sdpa" and softcapped:
        raise PolicyError("attention.kernel = \"sdpa\" cannot compute soft-capped attention (attn_logit_softcapping): "
                          "use attention.kernel = \"eager\" (or \"auto\")")
    return name


def _flash_missing(device: Device, dtype: str, installed: bool) -> str:
    if not installed:
        return "flash-attn is not installed (pip install 'longqlora-harness[flash]')"
    if not device.cuda:
        return "flash-attn needs a CUDA GPU"
    if device.capability < FLASH_CAPABILITY:
        return f"flash-attn needs compute capability 8.0 (Ampere) or newer, this card has {device.capability}"
    return f"flash-attn computes in bf16 or fp16, not {dtype}"


def sdpa_math_fallback(device: Device, dtype: str, *, gqa: bool, masked: bool) -> bool:
    """Whether CUDA SDPA runs its math kernel: unmasked GQA goes through enable_gqa, which only
    the flash kernel takes among the fused ones (Ampere or newer, 16-bit); masked GQA repeats
    k and v first and stays fused."""
    if not (device.cuda and gqa and not masked):
        return False
    return dtype not in HALF or device.capability < FLASH_CAPABILITY


EVAL_SHARE = 0.05  # the long-context watch's share of training time under train.eval_every = -1 (auto)


def eval_cadence(*, samples: int, readings: int, micro_batch_size: int, grad_accum: int,
                 checkpointing: bool) -> int:
    """Steps between evaluations that keep them near EVAL_SHARE of the training time.

    An evaluation runs `readings` no-grad forwards of each of a replica's `samples`; a step runs
    micro_batch_size x grad_accum samples of the same length forward and backward: about 3
    forwards each, 4 where gradient checkpointing recomputes the forward."""
    per_step = _forwards_per_step(micro_batch_size, grad_accum, checkpointing)
    return max(1, math.ceil(samples * readings / (EVAL_SHARE * per_step)))


def eval_samples_within(steps: int, *, readings: int, micro_batch_size: int, grad_accum: int,
                        checkpointing: bool) -> int:
    """How many held-out samples per replica a run of `steps` steps can score at its last step within
    EVAL_SHARE of its training time (at least 1: every run gets one reading)."""
    per_step = _forwards_per_step(micro_batch_size, grad_accum, checkpointing)
    return max(1, math.floor(EVAL_SHARE * steps * per_step / readings))


def _forwards_per_step(micro_batch_size: int, grad_accum: int, checkpointing: bool) -> int:
    return micro_batch_size * grad_accum * (4 if checkpointing else 3)
