"""The DeepSpeed engine: ZeRO-2/3 (CPU optimizer offload included), driven through
deepspeed.initialize with the JSON file named by engine.deepspeed_config.

The harness forms the process group itself (accelerate's DeepSpeed path forms no multi-rank
group on the CPU). "auto" values in the JSON file are filled from the recipe.

engine.sequence_parallel_size = N > 1 turns on Ulysses sequence parallelism (DeepSpeed's ALST,
harness.backends.sequence_parallel): DeepSpeed's groups of N consecutive ranks (its
parallel_state_sp, passed to deepspeed.initialize as mpu) share each micro-batch, and the
world_size / N groups are the data-parallel replicas. ZeRO partitions over all ranks; ZeRO-1/2
sum the gradients within a group and average them over the replicas, ZeRO-3's reduce-scatter
averages over every rank (the loss then scales its gradients by N: sequence_parallel.SequenceShards).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from harness import policy, rundir
from harness.backends import sequence_parallel
from harness.backends.engine import (EngineError, StepConfig, check_group, forming_group, is_quantized,
                                     keep_groups_until_exit, trainable)
from harness.registry import register


@register("engine", "deepspeed", description="DeepSpeed ZeRO-2/3 with optional CPU offload and Ulysses "
          "sequence parallelism", requires=(("deepspeed", "deepspeed>=0.17"),))
def deepspeed_engine(*, deepspeed_config: str, sequence_parallel_size: int = 1):
    return DeepSpeedEngine(deepspeed_config, sequence_parallel_size)


def offloads_optimizer(config: dict) -> bool:
    """Whether a DeepSpeed config steps the optimizer on the CPU (ZeRO-Offload). The planner asks this too."""
    return config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") == "cpu"


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The dtype this engine autocasts the forward to: None, at every precision and on every device:
    DeepSpeed casts the module to its fp16/bf16 itself (the config's "fp16" / "bf16" sections). The
    planner asks this too."""
    return None


class DeepSpeedEngine:
    """DeepSpeed ZeRO-2/3 (CPU optimizer offload included), initialised by the harness."""

    def __init__(self, config_path: str, sequence_parallel_size: int = 1):
        self.config_path = config_path
        self.sequence_parallel_size = sequence_parallel_size
        self.mpu = None  # DeepSpeed's sequence-parallel groups, when sequence_parallel_size > 1

    def setup(self) -> None:
        import deepspeed
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        with forming_group():
            _set_single_process_variables()
            deepspeed.init_distributed(dist_backend=backend)
        _gather_without_deprecation()
        try:
            self._join(dist)
        except BaseException:
            self.teardown()  # a refused launch leaves no group behind either
            raise

    def _join(self, dist) -> None:
        """This rank's place: rank, world size and device; the world size checked; the sequence groups."""
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        check_group(self.world_size)
        self._form_sequence_groups()

    def _form_sequence_groups(self) -> None:
        """data_rank / data_world_size, and under sequence parallelism DeepSpeed's groups of N ranks."""
        size = self.sequence_parallel_size
        self.data_rank, self.data_world_size, self.sequence = self.rank, self.world_size, None
        if size == 1:
            return
        try:
            sequence_parallel.check_world(self.world_size, size)
        except sequence_parallel.SequenceParallelError as error:
            raise EngineError(str(error)) from None
        import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

        mpu.initialize_sequence_parallel(sequence_parallel_size=size)
        self.mpu = mpu
        self.sequence = sequence_parallel.SequenceShards(mpu.get_sequence_parallel_group(),
                                                         mpu.get_sequence_parallel_rank(), size)
        self.data_rank = self.rank // size  # groups: consecutive ranks
        self.data_world_size = policy.data_world_size(self.world_size, size)

    def config(self, step_config: StepConfig) -> dict:
        """The JSON config with its "auto" values filled from the recipe."""
        try:
            config = json.loads(Path(self.config_path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise EngineError(f"engine.deepspeed_config = {self.config_path!r}: cannot read it: {error}") from None
        fill = {
            "train_micro_batch_size_per_gpu": step_config.micro_batch_size,
            "gradient_accumulation_steps": step_config.grad_accum,
            "gradient_clipping": step_config.max_grad_norm,
        }
        for key, value in fill.items():
            if config.get(key, "auto") == "auto":
                config[key] = value
        config.pop("train_batch_size", None)
        self._fill_sequence_parallel(config)
        for dtype in ("bf16", "fp16"):
            section = config.setdefault(dtype, {})
            if section.get("enabled", "auto") == "auto":
                section["enabled"] = step_config.precision == dtype
        return config

    def _fill_sequence_parallel(self, config: dict) -> None:
        """sequence_parallel_size comes from the recipe; a JSON file may repeat it, not contradict it."""
        given = config.get("sequence_parallel_size", "auto")
        if given not in ("auto", self.sequence_parallel_size):
            raise EngineError(f"engine.deepspeed_config = {self.config_path!r} sets sequence_parallel_size = {given}, "
                              f"the recipe engine.sequence_parallel_size = {self.sequence_parallel_size}: set it in "
                              f"the recipe only (remove it from the JSON file, or make it \"auto\")")
        config.pop("sequence_parallel_size", None)
        if self.sequence_parallel_size > 1:
            config["sequence_parallel_size"] = self.sequence_parallel_size

    def _sequence_gradient_scale(self, config: dict) -> int:
        """How DeepSpeed reduces a sequence-parallel group's gradients: ZeRO-0/1/2 sum them (1), ZeRO-3's
        reduce-scatter averages them with the data-parallel replicas' (N). ZeRO-3 without reduce_scatter
        sums some buckets and averages others, so it is refused."""
        zero = config.get("zero_optimization", {})
        if int(zero.get("stage", 0)) != 3:
            return 1
        if not zero.get("reduce_scatter", True):
            raise EngineError(f"engine.deepspeed_config = {self.config_path!r}: ZeRO-3 with reduce_scatter = false "
                              f"reduces sequence-parallel gradients inconsistently (summed in some buckets, averaged "
                              f"in others); set \"reduce_scatter\": true or use ZeRO-2")
        return self.sequence_parallel_size

    def offloads_optimizer(self, step_config: StepConfig) -> bool:
        return offloads_optimizer(self.config(step_config))

    def prepare(self, module, make_optimizer: Callable, make_scheduler: Callable, step_config: StepConfig):
        import deepspeed

        self.step_config = step_config
        module = module.to(self.device) if not is_quantized(module) else module
        if self.sequence is not None:
            sequence_parallel.enable(module.model, self.sequence, step_config.micro_batch_size)
            self.sequence.gradient_scale = self._sequence_gradient_scale(self.config(step_config))
        optimizer = make_optimizer(trainable(module))
        scheduler = make_scheduler(optimizer)
        self.module, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.config(step_config),
            model_parameters=trainable(module), mpu=self.mpu,
        )
        return self.module

    def autocast(self):
        dtype = autocast_dtype(self.step_config.precision, self.device.type)
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor, *, sync: bool) -> None:
        self.module.backward(loss)  # divides by gradient_accumulation_steps itself
        self.module.step()  # a no-op except at the accumulation boundary

    def step(self) -> float | None:
        norm = self.module.get_global_grad_norm()  # None: this optimizer does not report it
        return float(norm) if norm is not None else None

    def unwrap(self):
        return self.module.module

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, directory: Path) -> None:
        self.module.save_checkpoint(str(directory / rundir.DEEPSPEED_DIR), tag="state")

    def load_state(self, directory: Path) -> None:
        self.module.load_checkpoint(str(directory / rundir.DEEPSPEED_DIR), tag="state", load_module_strict=False)

    def gathered(self, model):
        """ZeRO-3 shards parameters: gather the trainable ones before reading them."""
        if not any(hasattr(p, "ds_id") for p in model.parameters()):
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(trainable(model), modifier_rank=None)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def all_mean(self, value: float) -> float:
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor) / self.world_size

    def teardown(self) -> None:
        """DeepSpeed's engine (its optimizer's hooks and buffers), then the sequence-parallel groups (the
        harness's attention lets go of them), then the process group with every group DeepSpeed made;
        deepspeed.comm drops its references to them (the groups stay referenced: keep_groups_until_exit)."""
        keep_groups_until_exit()
        module, self.module, self.optimizer, self.scheduler = getattr(self, "module", None), None, None, None
        if module is not None:
            module.destroy()
            del module
        import deepspeed.comm as ds_comm
        import torch.distributed as dist

        if self.sequence is not None:
            sequence_parallel.release(self.sequence)
        if self.mpu is not None:
            groups = (self.mpu.get_sequence_parallel_group(), self.mpu.get_sequence_data_parallel_group())
            self.mpu = None
            for group in groups:
                ds_comm.destroy_process_group(group)
            del groups
        if ds_comm.is_initialized() and dist.is_initialized():
            ds_comm.destroy_process_group()
        elif dist.is_initialized():  # DeepSpeed's init_distributed failed after torch formed the group
            dist.destroy_process_group()


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


def _set_single_process_variables() -> None:
    """A process that no launcher started (`python launch/train.py`, one-process `accelerate
    launch`) gets the variables the `deepspeed` launcher would set for a group of one, on a free
    local port. Without them DeepSpeed looks for MPI (mpi4py) and then asserts on LOCAL_RANK."""
    if all(name in os.environ for name in LAUNCHER_VARIABLES) or policy.launched_world_size() > 1:
        return
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(port))):
        os.environ.setdefault(name, value)


def _gather_without_deprecation() -> None:
    """DeepSpeed's torch backend picks torch.distributed.all_gather_into_tensor for ZeRO's all-gathers (the
    first that exists); torch 2.13 deprecates it for all_gather_single, the same function, and every rank
    printed a FutureWarning. DeepSpeed asks its backend object for the function it chose: give it the new one."""
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist

    backend = getattr(ds_comm, "cdb", None)
    if hasattr(dist, "all_gather_single") and getattr(backend, "all_gather_function", None) is not None:
        backend.all_gather_function = dist.all_gather_single
