"""The training loop on the tiny recipe: exact resume, learning, S2/full switch, bad input."""
from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness import checkpoint
from harness.recipe import load_recipe
from harness.train import TrainError, train
from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path_factory.getbasetemp() / "harness-cache"))
    monkeypatch.chdir(ROOT)


def tiny(output_dir: Path, *overrides: str):
    return load_recipe("recipes/tiny_cpu.toml", [f"train.output_dir=\"{output_dir}\"", "train.save_every=0",
                                                 "data.max_seq_length=256", *overrides])


def losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def test_resume_after_sigterm_is_exact(tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(tiny(straight, "train.max_steps=6", "train.save_every=3"))

    monkeypatch.setenv("HARNESS_SIGTERM_AT_STEP", "3")
    train(tiny(stopped, "train.max_steps=6", "train.save_every=3"))
    assert [p.name for _, p in checkpoint.checkpoints(stopped)] == ["checkpoint-3"]
    assert not (stopped / "final").exists()
    monkeypatch.delenv("HARNESS_SIGTERM_AT_STEP")
    train(tiny(stopped, "train.max_steps=6", "train.save_every=3", "train.resume=\"auto\""))

    assert losses(stopped) == losses(straight)  # 3 before the stop + 3 after, bit for bit
    final_a, final_b = adapter(straight / "final"), adapter(stopped / "final")
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        torch.testing.assert_close(final_a[name], final_b[name], rtol=0, atol=0)


def test_final_adapter_loads_with_peft_and_carries_rope(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = tiny(tmp_path, "train.max_steps=2")
    train(recipe)
    final = tmp_path / "final"
    rope = json.loads((final / "rope_parameters.json").read_text())
    assert rope["rope_parameters"]["rope_type"] == "linear" and rope["rope_parameters"]["factor"] == 2.0
    assert rope["max_position_embeddings"] == 512 and rope["original_context"] == 256
    assert (final / "recipe.toml").is_file()
    base_dir = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_s2_in_training_full_attention_in_eval(tmp_path):
    from harness.model import build_model

    built = build_model(tiny(tmp_path))
    ids = torch.randint(3, 260, (1, 256), generator=torch.Generator().manual_seed(0))
    model = built.model
    model.eval()
    with torch.no_grad():
        eval_logits = model(input_ids=ids).logits
        model.train()
        for module in model.modules():  # no dropout, so only the attention pattern differs
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        train_logits = model(input_ids=ids).logits
    group = 256 // 4
    # Inside the first group S2 and full attention see the same tokens; later they differ.
    torch.testing.assert_close(train_logits[:, : group // 2], eval_logits[:, : group // 2], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(train_logits[:, group:], eval_logits[:, group:], atol=1e-4)


def test_qlora_s2_learns_real_text(tmp_path, book_path):
    train(tiny(tmp_path, f"data.path=\"{book_path}\"", "train.max_steps=20", "train.grad_accum=1",
               "train.micro_batch_size=2"))
    curve = losses(tmp_path)
    assert len(curve) == 20
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first - 0.3, curve  # bytes of English: the loss falls well below ln(260) = 5.56


def test_existing_run_is_refused(tmp_path):
    train(tiny(tmp_path, "train.max_steps=1"))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(TrainError, match="already holds a run.*--resume.*overwrite=true"):
        train(tiny(tmp_path, "train.max_steps=1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(TrainError, match="is not writable"):
        train(tiny(blocker / "run", "train.max_steps=1"))


def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch):
    real = checkpoint.write_trainer_state

    def full_disk(directory, state, rank):
        if state["step"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(directory, state, rank)

    monkeypatch.setattr(checkpoint, "write_trainer_state", full_disk)
    with pytest.raises(TrainError, match="No space left on device; the previous checkpoint .*checkpoint-2 is intact"):
        train(tiny(tmp_path, "train.max_steps=6", "train.save_every=2"))
    assert [p.name for _, p in checkpoint.checkpoints(tmp_path)] == ["checkpoint-2"]
    assert not list(tmp_path.glob(".checkpoint-*"))  # no half-written directory left behind
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_no_process_group_is_an_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "launch/train.py", "recipes/tiny_cpu.toml", f"train.output_dir=\"{tmp_path}\""],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "WORLD_SIZE": "2", "HARNESS_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "could not form the process group (WORLD_SIZE=2)" in result.stderr
