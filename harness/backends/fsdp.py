"""FSDP2 (torch's `fully_shard`) for the accelerate engine, applied by the harness itself.

accelerate shards with FSDP only on accelerators: on the CPU, `Accelerator(cpu=True)` turns an
FSDP launch into plain MULTI_CPU DDP without a word, so a config that asks for FSDP would be
tested as something else. The harness therefore shards the model itself, the same code on the
CPU (gloo) and on GPUs, reading the settings `accelerate launch --config_file
launch/accelerate/fsdp.yaml` puts in the environment (ACCELERATE_USE_FSDP, FSDP_*).

What is sharded: every decoder layer, then the root (embeddings, final norm, head). Each
parameter, the frozen 4-bit base weights included, is split along dim 0 over the ranks and
gathered for the forward and backward of its layer. FSDP2 shards parameter by parameter, so the
packed NF4 weights (uint8 or a float storage dtype) shard like any tensor; bitsandbytes restores a
gathered weight's quantization state from its module (`Linear4bit.quant_state`). FSDP2 needs one
dtype across a layer's trainable parameters only (the LoRA adapters, fp32).

Trainable parameters and their optimizer state are DTensors: the adapter is gathered into full
tensors to be written (`full_trainable_state`), and each rank saves and loads its own optimizer
shard, so a checkpoint resumes on the same number of ranks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from harness.backends.engine import EngineError

CONFIG = "launch/accelerate/fsdp.yaml"
ONE_PROCESS_WARNING = ("warning: the launch asks for FSDP but started one process, which shards nothing "
                       "(`accelerate launch --cpu` starts one whatever --num_processes says: leave --cpu out, the "
                       "harness runs on the CPU where there is no GPU)")
UNSUPPORTED = {  # accelerate FSDP settings the harness does not honour: {environment variable: what to do}
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "it loads the base on rank 0 only, and the harness shards a base every rank "
                                      "loaded; set it to false",
    "FSDP_ACTIVATION_CHECKPOINTING": "set it to false and use train.gradient_checkpointing = true in the recipe",
}


@dataclass(frozen=True)
class FsdpSettings:
    layer_classes: tuple[str, ...]  # decoder layer class names to shard one by one (empty: the model's own)
    reshard_after_forward: bool
    offload_params: bool


def requested() -> FsdpSettings | None:
    """The FSDP settings of this launch, None where it did not ask for FSDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise EngineError(f"the launch asks for FSDP version {version}; the harness shards with FSDP2 only: set "
                          f"fsdp_version: 2 in the accelerate config (as {CONFIG} does)")
    for flag, instead in UNSUPPORTED.items():
        if _flag(flag, False):
            raise EngineError(f"the launch sets {flag} (accelerate config: "
                              f"{flag.lower()}: true), which the harness's FSDP does not do: {instead}")
    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return FsdpSettings(layer_classes=tuple(name.strip() for name in names.split(",") if name.strip()),
                        reshard_after_forward=_flag("FSDP_RESHARD_AFTER_FORWARD", True),
                        offload_params=_flag("FSDP_OFFLOAD_PARAMS", False))


def _flag(name: str, default: bool) -> bool:
    return os.environ.get(name, str(default)).lower() == "true"


def shard(module: torch.nn.Module, settings: FsdpSettings, device: torch.device, world_size: int) -> None:
    """fully_shard every decoder layer of `module`, then `module` itself, over all ranks (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    _broadcast_trainable(module)
    mesh = init_device_mesh(device.type, (world_size,))
    offload = CPUOffloadPolicy() if settings.offload_params and device.type != "cpu" else OffloadPolicy()
    options = {"mesh": mesh, "reshard_after_forward": settings.reshard_after_forward, "offload_policy": offload}
    for layer in decoder_layers(module, settings.layer_classes):
        fully_shard(layer, **options)
    fully_shard(module, **options)


def _broadcast_trainable(module: torch.nn.Module) -> None:
    """Every rank starts from rank 0's adapter, as DDP does when it wraps: each rank initialised its
    LoRA A matrices from its own RNG stream, and FSDP would stitch the ranks' shards together.
    The frozen base weights come from the same file (or seed) on every rank."""
    import torch.distributed as dist

    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                dist.broadcast(parameter.data, src=0)


def decoder_layers(module: torch.nn.Module, names: tuple[str, ...]) -> list[torch.nn.Module]:
    """The modules to shard one by one: the configured classes, else the model's `_no_split_modules`."""
    wanted = set(names) or {name for m in module.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    layers = [m for m in module.modules() if type(m).__name__ in wanted]
    if not layers:
        present = sorted({type(m).__name__ for m in module.modules() if "Layer" in type(m).__name__})
        raise EngineError(f"FSDP: no module of class {sorted(wanted)} in the model to shard; set "
                          f"fsdp_transformer_layer_cls_to_wrap in the accelerate config to its decoder layer "
                          f"(one of {present})")
    return layers


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole on every rank (a collective); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{state-dict name: full tensor} of the trainable parameters, gathered on every rank."""
    return {name: full(p.detach()).cpu() for name, p in model.named_parameters() if p.requires_grad}
