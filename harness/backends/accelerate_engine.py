"""The accelerate engine: single process, DDP (multi-GPU, or MULTI_CPU over gloo) and FSDP2, as
`accelerate launch` or torchrun configure it.

On the CPU it must create `Accelerator(cpu=True)`: without it every process of a multi-process
launch silently trains alone with world size 1. A launch that asks for FSDP is sharded by
harness.backends.fsdp, not by accelerate (whose FSDP needs an accelerator).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable

import torch

from harness import rundir
from harness.backends import fsdp
from harness.backends.engine import (EngineError, StepConfig, check_group, forming_group, is_quantized,
                                     keep_groups_until_exit, trainable)
from harness.registry import register


@register("engine", "accelerate", description="accelerate: single process, DDP, FSDP (GPU or CPU/gloo)",
          requires=(("accelerate", "accelerate>=1.10"),))
def accelerate_engine():
    return AccelerateEngine()


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The dtype this engine autocasts the forward to (None: no autocast): bf16/fp16 on CUDA only.
    The memory planner asks this too."""
    if device_type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


class AccelerateEngine:
    """accelerate: single process, DDP or FSDP, GPU or CPU (gloo)."""

    def setup(self) -> None:
        from accelerate import Accelerator

        with forming_group():
            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        try:
            self._join()
        except BaseException:
            self.teardown()  # a refused launch leaves no group behind either
            raise

    def _join(self) -> None:
        """This rank's place: rank, world size and device; the world size checked; FSDP asked for or not."""
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        # no sequence parallelism
        self.data_rank, self.data_world_size, self.sequence = self.rank, self.world_size, None
        self.device = self.accelerator.device
        self.fsdp = fsdp.requested()
        check_group(self.world_size)
        if self.fsdp is not None and self.world_size == 1:
            print(fsdp.ONE_PROCESS_WARNING, file=sys.stderr)

    def offloads_optimizer(self, step_config: StepConfig) -> bool:
        return False

    def prepare(self, module, make_optimizer: Callable, make_scheduler: Callable, step_config: StepConfig):
        self.step_config = step_config
        fp16_on_cuda = step_config.precision == "fp16" and torch.cuda.is_available()
        self.scaler = torch.amp.GradScaler("cuda") if fp16_on_cuda else None
        module = module.to(self.device) if not is_quantized(module) else module
        if self.fsdp is not None:
            fsdp.shard(module, self.fsdp, self.device, self.world_size)  # before the optimizer: DTensor parameters
            self.module, self.optimizer = module, make_optimizer(trainable(module))
        else:
            self.module, self.optimizer = self.accelerator.prepare(module, make_optimizer(trainable(module)))
        self.scheduler = make_scheduler(self.optimizer)
        return self.module

    def autocast(self):
        dtype = autocast_dtype(self.step_config.precision, self.device.type)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def backward(self, loss: torch.Tensor, *, sync: bool) -> None:
        scaled = loss / self.step_config.grad_accum
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        if self.fsdp is not None:
            self.module.set_requires_gradient_sync(sync)  # off: gradients accumulate unsharded, no reduce-scatter
            scaled.backward()
        elif sync or self.world_size == 1:
            scaled.backward()
        else:
            with self.accelerator.no_sync(self.module):
                scaled.backward()

    def step(self) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(trainable(self.module), self.step_config.max_grad_norm or float("inf"))
        norm = fsdp.full(norm)  # FSDP: the norm over every rank's shards
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips a step with inf/NaN gradients and lowers the scale
            self.scaler.update()
        elif torch.isfinite(norm):
            self.optimizer.step()  # a non-finite gradient never reaches the weights: the loop stops the run
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def unwrap(self):
        return self.accelerator.unwrap_model(self.module)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, directory: Path) -> None:
        """DDP: rank 0 writes the optimizer state, the same on every rank. FSDP: each rank its own shard."""
        if self.fsdp is None and self.rank > 0:
            return
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, self._optimizer_file(directory))

    def _optimizer_file(self, directory: Path) -> Path:
        return rundir.optimizer_shard_file(directory, self.rank) if self.fsdp else directory / rundir.OPTIMIZER_FILE

    def load_state(self, directory: Path) -> None:
        path = self._optimizer_file(directory)
        if not path.is_file():
            raise EngineError(f"{directory}: no {path.name} in it. Resume an FSDP checkpoint with FSDP on as many "
                              f"ranks as wrote it, and a DDP or single-process one without FSDP")
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def gathered(self, model):
        """DDP replicates: nothing to gather. FSDP: the trainable weights gathered whole (every rank)."""
        if self.fsdp is None:
            return contextlib.nullcontext()
        return contextlib.nullcontext(fsdp.full_trainable_state(model))

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def all_mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], device=self.device, dtype=torch.float64)
        return float(self.accelerator.reduce(tensor, reduction="mean"))

    def teardown(self) -> None:
        """The prepared module (DDP's reducer or FSDP's shards hold the group), optimizer and scheduler, which
        accelerate lets go of too; then the process group (FSDP's mesh is a view of it), which stays referenced
        (keep_groups_until_exit)."""
        import torch.distributed as dist

        keep_groups_until_exit()
        self.module = self.optimizer = self.scheduler = None
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None:
            accelerator.free_memory()  # its own lists of prepared models and optimizers
        if dist.is_initialized():
            dist.destroy_process_group()
