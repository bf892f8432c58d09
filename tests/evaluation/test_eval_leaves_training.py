"""An in-training evaluation leaves the model exactly as it found it.

bitsandbytes on an AVX512-BF16 CPU repacks a Linear4bit's NF4 weight the first time the layer runs
in eval mode without gradients, and then multiplies with gemv_4bit, which has no autograd: before
harness.backends.quantization.training_layout_kept, `train.eval_every=1` trained another adapter
than evaluating only at the end (step-2 gradient norm 0.461 against 0.707), and resume with
evaluation on was off by 3e-4. Where the CPU lacks AVX512-BF16 the layers are told it has it, as
bitsandbytes decides at their construction, so the repack is attempted on every machine.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.recipe import load_recipe
from harness.train import train

HELD_OUT = 'data.eval_path="recipes/data/books/the_complete_angler.txt"'


@pytest.fixture
def repacking_cpu(monkeypatch, session_cache):
    """Linear4bit layers built from here on repack in eval mode, as on an AVX512-BF16 CPU."""
    from bitsandbytes.nn import modules

    if not modules.has_avx512bf16():
        monkeypatch.setattr(modules, "has_avx512bf16", lambda: True)


def tiny(output_dir: Path, *overrides: str):
    return load_recipe("recipes/tiny_cpu.toml", [f"train.output_dir=\"{output_dir}\"", "train.save_every=0",
                                                 "data.max_seq_length=256", "adapter.dropout=0.0", HELD_OUT,
                                                 "train.eval_batches=1", *overrides])


def assert_identical(a: Path, b: Path) -> None:
    first, second = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0, msg=name)


def grad_norms(output_dir: Path) -> list[float]:
    rows = map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
    return [row["grad_norm"] for row in rows if "grad_norm" in row]


def test_evaluating_every_step_trains_the_adapter_evaluating_at_the_end_trains(tmp_path, repacking_cpu):
    train(tiny(tmp_path / "every", "train.max_steps=3", "train.eval_every=1"))
    train(tiny(tmp_path / "end", "train.max_steps=3", "train.eval_every=0"))
    assert grad_norms(tmp_path / "every") == grad_norms(tmp_path / "end")
    assert_identical(tmp_path / "every" / "final", tmp_path / "end" / "final")


def test_resume_with_evaluation_on_is_bit_exact(tmp_path, repacking_cpu):
    common = ("train.max_steps=4", "train.eval_every=1", "train.save_every=2")
    train(tiny(tmp_path / "straight", *common))
    stop_after_3 = lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 3 else None  # noqa: E731
    train(tiny(tmp_path / "stopped", *common), after_step=stop_after_3)
    train(tiny(tmp_path / "stopped", *common, "train.resume=\"auto\""))
    assert grad_norms(tmp_path / "stopped")[-2:] == grad_norms(tmp_path / "straight")[-2:]
    assert_identical(tmp_path / "stopped" / "final", tmp_path / "straight" / "final")


def test_an_evaluation_leaves_no_layer_repacked(repacking_cpu):
    """The layers after an evaluation: none in the inference layout, and gradients flow through them."""
    from harness.loop_memory import training_loop

    loop = training_loop(load_recipe("recipes/tiny_cpu.toml", ["data.max_seq_length=256"]))
    item = {"input_ids": list(range(3, 259)), "labels": list(range(3, 259)), "position_ids": list(range(256))}
    loop.evaluator.run(loop.engine.module, [item])
    layers = [m for m in loop.built.model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]  # bitsandbytes'

    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert all(m.support_avx512bf16_for_cpu for m in layers)  # restored: inference tools keep the fast path
