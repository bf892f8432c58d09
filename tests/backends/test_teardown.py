"""Engine.teardown: what setup and prepare started, undone on every rank at the end of a run (issue 34).

Each case runs in its own process (a process group is process-wide state): an engine set up over gloo
in a group of one, its module prepared, then torn down. Afterwards no process group is initialized;
the destroyed groups themselves stay referenced until the process ends (their gloo threads with them:
freeing a group while a peer may still close its sockets aborts a rank, docs/faults.md), and
launch/train.py ends the process without interpreter teardown (tests/cli/test_train_exit.py). A
setup that refuses tears down what it formed itself; a second teardown does nothing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT, free_port

CHILD = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    from harness.backends.engine import EngineError, StepConfig

    COMMUNICATION = ("pt_gloo_runloop", "gloo_tcp_loop", "pt_tcpstore_uv")

    def threads():
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        return sorted(name for name in names if name.startswith(COMMUNICATION))

    def engine_of(kind, size=1):
        if kind == "deepspeed":
            from harness.backends.deepspeed_engine import DeepSpeedEngine
            return DeepSpeedEngine("launch/deepspeed/zero2_offload.json", size)
        from harness.backends.accelerate_engine import AccelerateEngine
        return AccelerateEngine()

    kind, case = sys.argv[1], sys.argv[2]
    report = {}
    if case == "refused":
        try:
            engine_of(kind, size=2).setup()  # sequence parallelism over 2 ranks in a world of one
        except EngineError as error:
            report["refused"] = str(error)
    else:
        engine = engine_of(kind)
        engine.setup()
        report["formed"] = threads()
        step_config = StepConfig(micro_batch_size=1, grad_accum=1, max_grad_norm=1.0, precision="fp32")
        module = torch.nn.Linear(4, 4)
        if kind == "deepspeed":  # ZeRO-Offload steps with DeepSpeed's CPU Adam
            from deepspeed.ops.adam import DeepSpeedCPUAdam as Optimizer
        else:
            Optimizer = torch.optim.AdamW
        engine.prepare(module, lambda params: Optimizer(params, lr=1e-3),
                       lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), step_config)
        engine.backward(engine.module(torch.ones(1, 4)).sum(), sync=True)
        engine.step()
        del module  # as train() lets go of its session before the teardown
        engine.teardown()
        engine.teardown()  # again: nothing
    report["initialized"] = dist.is_initialized()
    report["left"] = threads()
    print(json.dumps(report))
''')


def run_child(kind: str, case: str, env_extra: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None) if name not in env_extra else None
    result = subprocess.run([sys.executable, "-c", CHILD, kind, case], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def group_of_one() -> dict:
    """The variables torchrun sets for a world of one: accelerate forms a gloo group of one under them."""
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}


@pytest.mark.parametrize("kind", [pytest.param("deepspeed", marks=pytest.mark.slow),  # 216 s on a fresh venv
                                  "accelerate"])
def test_teardown_destroys_every_group(kind):
    report = run_child(kind, "run", group_of_one())
    assert report["formed"]  # a gloo group was formed (its store and, once used, its threads) ...
    assert not report["initialized"]  # ... and destroyed; a second teardown did nothing


@pytest.mark.slow  # 40 s (a DeepSpeed child); the accelerate teardown stays in the default suite
def test_a_refused_setup_tears_down_the_group_it_formed():
    report = run_child("deepspeed", "refused", {})
    assert "does not divide" in report["refused"]
    assert not report["initialized"]
