"""Held-out evaluation under ZeRO-3 on 2 CPU ranks: every forward is a collective.

3 held-out samples over 2 replicas give rank 0 two and rank 1 one; rank 1 pads with a
zero-weight sample so both run as many forwards. Before, rank 0's second forward waited for a
parameter gather rank 1 never joined: the run hung. The evaluation must also read what one
process reads (token-weighted over both ranks' samples).
"""
from __future__ import annotations

import sys

import pytest

from tests.conftest import free_port
from tests.distributed.test_sequence_parallel import VENV_BIN, launch, losses

UNQUANTIZED_ODD_HOLDOUT = ["quantization.name=\"none\"", "train.eval_holdout=3", "train.eval_every=1"]


@pytest.mark.slow
def test_zero3_ranks_evaluate_an_odd_held_out_split_as_one_process(tmp_path):
    cache = tmp_path / "cache"
    launch([sys.executable], tmp_path / "single", *UNQUANTIZED_ODD_HOLDOUT, cache=cache)
    launcher = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", free_port()]
    launch(launcher, tmp_path / "zero3", *UNQUANTIZED_ODD_HOLDOUT, "train.grad_accum=1", "engine.name=\"deepspeed\"",
           "engine.deepspeed_config=\"launch/deepspeed/zero3.json\"", cache=cache, timeout=600)
    single = losses(tmp_path / "single", "eval_loss")
    assert len(single) == 3  # every step
    assert losses(tmp_path / "zero3", "eval_loss") == pytest.approx(single, rel=1e-4)
