"""Engines: process group, device, backward/step and optimizer state on disk.

Both engines give the training loop the same small surface:

    engine.setup()                         process group + device; checks the world size
    module = engine.prepare(module, make_optimizer, make_scheduler, hyper)
    engine.backward(loss, sync=bool)       one micro-batch (sync=False: no gradient all-reduce)
    grad_norm = engine.step()              clip, optimizer and scheduler step, zero grads
    engine.save_state(dir) / load_state(dir)   optimizer + scheduler (+ DeepSpeed's own files)

The accelerate engine runs single-process, DDP (multi-GPU, or MULTI_CPU over gloo) and FSDP
as `accelerate launch` / torchrun configure it. On the CPU it must create
`Accelerator(cpu=True)`: without it every process silently trains alone. The DeepSpeed engine
calls deepspeed.initialize itself (accelerate's DeepSpeed path forms no group on the CPU).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from harness.errors import HarnessError


class EngineError(HarnessError, RuntimeError):
    """The launch and the recipe disagree; the message says how to launch instead."""


@dataclass(frozen=True)
class Hyper:
    micro_batch_size: int
    grad_accum: int
    max_grad_norm: float
    precision: str  # bf16 | fp16 | fp32 (resolved)


def expected_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_precision(precision: str, quant_compute_dtype: str) -> str:
    """"auto": the quantization compute dtype on a GPU (bf16 where supported), fp32 on the CPU."""
    from harness.backends.quantization import device_dtype

    if precision != "auto":
        return precision
    if not torch.cuda.is_available():
        return "fp32"
    if quant_compute_dtype == "bf16" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return device_dtype(quant_compute_dtype)


class _forming_group:
    """Rendezvous failures become one EngineError that says how to launch."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, (ValueError, RuntimeError)) and not isinstance(error, EngineError):
            raise EngineError(
                f"could not form the process group (WORLD_SIZE={expected_world_size()}): {error}. Start the "
                f"processes with accelerate launch, torchrun or deepspeed, which set MASTER_ADDR, RANK and WORLD_SIZE"
            ) from None
        return False


def _check_group(world_size: int) -> None:
    expected = expected_world_size()
    if expected > 1 and world_size != expected:
        raise EngineError(
            f"WORLD_SIZE={expected} processes were launched but the process group has {world_size}: each would "
            f"train alone. Launch through accelerate launch / torchrun / deepspeed so they can rendezvous"
        )


class AccelerateEngine:
    """accelerate: single process, DDP or FSDP, GPU or CPU (gloo)."""

    name = "accelerate"

    def setup(self) -> None:
        from accelerate import Accelerator

        with _forming_group():
            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.device = self.accelerator.device
        _check_group(self.world_size)

    def prepare(self, module, make_optimizer: Callable, make_scheduler: Callable, hyper: Hyper):
        self.hyper = hyper
        self.scaler = torch.amp.GradScaler("cuda") if hyper.precision == "fp16" and torch.cuda.is_available() else None
        module = module.to(self.device) if not _is_quantized(module) else module
        optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad])
        scheduler = make_scheduler(optimizer)
        self.module, self.optimizer = self.accelerator.prepare(module, optimizer)
        self.scheduler = scheduler
        return self.module

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.hyper.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None and self.device.type == "cuda")

    def backward(self, loss: torch.Tensor, *, sync: bool) -> None:
        scaled = loss / self.hyper.grad_accum
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        if sync or self.world_size == 1:
            scaled.backward()
        else:
            with self.accelerator.no_sync(self.module):
                scaled.backward()

    def step(self) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.hyper.max_grad_norm or float("inf"))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def unwrap(self):
        return self.accelerator.unwrap_model(self.module)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, directory: Path) -> None:
        if self.rank == 0:  # DDP: optimizer state is the same on every rank
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            torch.save(state, directory / "optimizer.pt")

    def load_state(self, directory: Path) -> None:
        state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def all_mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], device=self.device, dtype=torch.float64)
        return float(self.accelerator.reduce(tensor, reduction="mean"))


class DeepSpeedEngine:
    """DeepSpeed ZeRO-2/3 (CPU optimizer offload included), initialised by the harness."""

    name = "deepspeed"

    def __init__(self, config_path: str):
        self.config_path = config_path

    def setup(self) -> None:
        import deepspeed
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        with _forming_group():
            deepspeed.init_distributed(dist_backend=backend)
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        _check_group(self.world_size)

    def config(self, hyper: Hyper) -> dict:
        """The JSON config with its "auto" values filled from the recipe."""
        try:
            config = json.loads(Path(self.config_path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise EngineError(f"engine.deepspeed_config = {self.config_path!r}: cannot read it: {error}") from None
        fill = {
            "train_micro_batch_size_per_gpu": hyper.micro_batch_size,
            "gradient_accumulation_steps": hyper.grad_accum,
            "gradient_clipping": hyper.max_grad_norm,
        }
        for key, value in fill.items():
            if config.get(key, "auto") == "auto":
                config[key] = value
        config.pop("train_batch_size", None)
        for dtype in ("bf16", "fp16"):
            section = config.setdefault(dtype, {})
            if section.get("enabled", "auto") == "auto":
                section["enabled"] = hyper.precision == dtype
        return config

    def offloads_optimizer(self, hyper: Hyper) -> bool:
        zero = self.config(hyper).get("zero_optimization", {})
        return zero.get("offload_optimizer", {}).get("device", "none") == "cpu"

    def prepare(self, module, make_optimizer: Callable, make_scheduler: Callable, hyper: Hyper):
        import deepspeed

        self.hyper = hyper
        module = module.to(self.device) if not _is_quantized(module) else module
        optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad])
        scheduler = make_scheduler(optimizer)
        self.module, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.config(hyper),
            model_parameters=[p for p in module.parameters() if p.requires_grad],
        )
        return self.module

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()  # DeepSpeed casts the module to its fp16/bf16 itself

    def backward(self, loss: torch.Tensor, *, sync: bool) -> None:
        self.module.backward(loss)  # divides by gradient_accumulation_steps itself
        self.module.step()  # a no-op except at the accumulation boundary

    def step(self) -> float:
        norm = self.module.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def unwrap(self):
        return self.module.module

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, directory: Path) -> None:
        self.module.save_checkpoint(str(directory / "deepspeed"), tag="state")

    def load_state(self, directory: Path) -> None:
        self.module.load_checkpoint(str(directory / "deepspeed"), tag="state", load_module_strict=False)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def all_mean(self, value: float) -> float:
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor) / self.world_size


def _is_quantized(module) -> bool:
    """bitsandbytes layers are placed at load time; moving them again would re-quantize."""
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in module.modules())
