"""The engine kind: who owns the process group, the optimizer step and the state on disk.

Every engine implements `Engine`, and the training loop speaks only this interface (it never
asks which engine it has):

    engine.setup()                         process group + device; checks the world size
    engine.offloads_optimizer(step_config) whether the optimizer steps on the CPU (ZeRO offload)
    module = engine.prepare(module, make_optimizer, make_scheduler, step_config)
    engine.backward(loss, sync=bool)       one micro-batch (sync=False: no gradient all-reduce)
    grad_norm = engine.step()              clip, optimizer and scheduler step, zero grads
    engine.save_state(dir) / load_state(dir)   optimizer + scheduler (+ DeepSpeed's own files)
    with engine.gathered(model) as whole:  sharded trainable parameters made whole: ZeRO-3 in place
                                           (whole is None), FSDP as {name: full tensor}
    engine.teardown()                      at the end of every finished run, on every rank: what setup
                                           and prepare started, undone in reverse (the engine's own state,
                                           its sub-groups, the process group); again: nothing. A setup
                                           that fails tears down what it started itself; a run that fails
                                           ends its process after its message (torn_down says why).

Why teardown: the engine's state and torch's registry of groups are undone in order on every path;
the groups themselves stay referenced until the process ends (keep_groups_until_exit), which
launch/train.py ends without interpreter teardown: freeing a gloo group while a peer may still close
its sockets aborted a rank after its last line now and then ("terminate called without an active
exception", the launcher's exit 250; docs/faults.md, issue 34).

Ranks and data: `rank` / `world_size` count processes; `data_rank` / `data_world_size` count
data-parallel replicas, which read different samples. They differ under sequence parallelism
(DeepSpeed's engine.sequence_parallel_size = N): the N ranks of a group train on the same
micro-batch, each on 1/N of every sequence, so data_world_size = world_size / N, and
`sequence` is that rank's harness.backends.sequence_parallel.SequenceShards (None without).

The engines, one file each: harness.backends.accelerate_engine (single process, DDP, FSDP)
and harness.backends.deepspeed_engine (ZeRO-2/3, CPU offload).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Protocol

import torch
import torch.distributed as dist

from harness import policy
from harness.errors import HarnessError


class EngineError(HarnessError, RuntimeError):
    """The launch and the recipe disagree; the message says how to launch instead."""


@dataclass(frozen=True)
class StepConfig:
    """What an engine needs of one optimizer step: the micro-batch size, the micro-batches per step, the
    gradient clipping and the precision (harness.session.step_config_of). The learning rate and its
    schedule are the optimizer's and the scheduler's, made by the harness, not the engine."""
    micro_batch_size: int
    grad_accum: int
    max_grad_norm: float
    precision: str  # bf16 | fp16 | fp32 (resolved by harness.policy.precision)


class Engine(Protocol):
    rank: int
    world_size: int
    data_rank: int  # this rank's data-parallel replica: which samples it reads
    data_world_size: int  # data-parallel replicas: world_size / sequence_parallel_size
    sequence: object | None  # SequenceShards under sequence parallelism, else None
    device: torch.device
    module: torch.nn.Module  # the prepared (wrapped) module, after prepare()
    step_config: StepConfig  # the step configuration prepare() was given

    def setup(self) -> None: ...
    def offloads_optimizer(self, step_config: StepConfig) -> bool: ...
    def prepare(self, module, make_optimizer: Callable, make_scheduler: Callable, step_config: StepConfig): ...
    def autocast(self) -> ContextManager: ...
    def backward(self, loss: torch.Tensor, *, sync: bool) -> None: ...
    def step(self) -> float: ...
    def unwrap(self) -> torch.nn.Module: ...
    def lr(self) -> float: ...
    def save_state(self, directory: Path) -> None: ...
    def load_state(self, directory: Path) -> None: ...
    def gathered(self, model) -> ContextManager: ...
    def barrier(self) -> None: ...
    def all_mean(self, value: float) -> float: ...
    def teardown(self) -> None: ...


# --------------------------------------------------------------------------- shared by the engines

class forming_group:
    """Rendezvous failures become one EngineError that says how to launch."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, (ValueError, RuntimeError)) and not isinstance(error, EngineError):
            raise EngineError(
                f"could not form the process group (WORLD_SIZE={policy.launched_world_size()}): {error}. Start the "
                f"processes with accelerate launch, torchrun or deepspeed, which set MASTER_ADDR, RANK and WORLD_SIZE"
            ) from None
        return False


def check_group(world_size: int) -> None:
    expected = policy.launched_world_size()
    if expected > 1 and world_size != expected:
        raise EngineError(
            f"WORLD_SIZE={expected} processes were launched but the process group has {world_size}: each would "
            f"train alone. Launch through accelerate launch / torchrun / deepspeed so they can rendezvous"
        )


def is_quantized(module) -> bool:
    """bitsandbytes layers are placed at load time; moving them again would re-quantize."""
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in module.modules())


def trainable(module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def local_shard(parameter: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds: its ZeRO-3 partition, its FSDP shard, or all of it."""
    if hasattr(parameter, "ds_tensor"):
        return parameter.ds_tensor
    return parameter.to_local() if hasattr(parameter, "to_local") else parameter


@contextlib.contextmanager
def torn_down(engine: Engine):
    """Run the body, then engine.teardown() when it finished. A failed body's error propagates untouched:
    its process ends right after its one-line message (harness.cli.train.exit_process), and a teardown
    there could wait on a peer that is gone while the launcher kills this rank before the message is out."""
    yield engine
    engine.teardown()


_GROUPS_UNTIL_EXIT: list = []  # destroyed process groups, still referenced: see keep_groups_until_exit


def keep_groups_until_exit() -> None:
    """Before a teardown destroys them: every process group of this process stays referenced until the
    process ends (harness.cli.train.exit_process ends it without destroying anything).

    gloo aborts a process (std::terminate, "terminate called without an active exception") when the
    last reference to a group's TCP loop is dropped on that loop's own thread: that happens when this
    rank has let go of the group and the peer then closes its sockets, at interpreter exit or at any
    time after a teardown that freed the groups. A group referenced here is never freed."""
    if dist.is_available() and dist.is_initialized():
        from torch.distributed import distributed_c10d

        _GROUPS_UNTIL_EXIT.extend(distributed_c10d._world.pg_map)  # every group: the world's, DeepSpeed's, SP's
