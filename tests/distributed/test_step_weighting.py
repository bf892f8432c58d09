"""Token-weighted steps across ranks: 2 gloo ranks x grad_accum 2 train as one process that takes
the step's 4 samples as one micro-batch, on documents whose target counts differ 20-fold.

The reference (1 x 4, one padded micro-batch) weighs every target token of a step the same by
construction; a mean per micro-batch averaged over micro-batches and ranks (the code before)
weighs the tokens of a short document up to 20 times more, and its loss curve and adapter
drift from the reference by far more than the 1e-5 float rounding allowed here. Single-process
accumulation is tested against an independent reference in tests/test_step_weighting.py.
"""
from __future__ import annotations

import sys

import pytest

from tests.conftest import free_port
from tests.distributed.test_sequence_parallel import (SP2, TOLERANCE, VENV_BIN, assert_same_adapter, launch, losses,
                                                       write_documents)

# byte lengths (+ BOS + EOS tokens): each step's 4 samples mix long and short documents
LENGTHS = [250, 12, 200, 30, 240, 10, 180, 50, 230, 20, 160, 40]
# full attention: S2's groups follow the padded length, so padding would change the function itself
FULL = ["attention.name=\"full\"", "train.eval_holdout=0"]  # all 12 documents train: 3 steps of 4, no epoch wrap
TRUNCATE = [*FULL, "data.mode=\"truncate\"", "train.micro_batch_size=1", "train.grad_accum=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the step's 4 documents as one padded micro-batch; and the cache the runs share."""
    base = tmp_path_factory.mktemp("weighting")
    documents = write_documents(base / "docs.jsonl", LENGTHS)
    data = [f"data.path=\"{documents}\"", *FULL]
    launch([sys.executable], base / "single", *data, "data.mode=\"truncate\"", "train.micro_batch_size=4",
           "train.grad_accum=1", cache=base / "cache")
    return base, data


def accelerate_ddp() -> list[str]:
    return [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port()]


def accelerate_fsdp() -> list[str]:
    return [str(VENV_BIN / "accelerate"), "launch", "--config_file", "launch/accelerate/fsdp.yaml", "--num_processes",
            "2", "--main_process_port", free_port()]


def deepspeed(*config: str) -> tuple[list[str], list[str]]:
    return [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", free_port()], list(config)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["ddp", "fsdp2", "zero2_offload", "sequence_parallel"])
def test_two_ranks_weigh_every_target_token_as_one_process(reference, path):
    """DDP, FSDP2 and ZeRO-2 with CPU offload: 2 replicas x grad_accum 2. Sequence parallelism: 1 replica of
    2 ranks x grad_accum 4."""
    base, data = reference
    launcher, engine = {
        "ddp": (accelerate_ddp(), []),
        "fsdp2": (accelerate_fsdp(), []),
        "zero2_offload": deepspeed("engine.name=\"deepspeed\"",
                                   "engine.deepspeed_config=\"launch/deepspeed/zero2_offload.json\""),
        "sequence_parallel": deepspeed(*SP2, "train.grad_accum=4"),
    }[path]
    run = base / path
    launch(launcher, run, *data, *TRUNCATE, *engine, cache=base / "cache")
    assert losses(run) == pytest.approx(losses(base / "single"), abs=TOLERANCE)
    assert_same_adapter(run / "final", base / "single" / "final")
