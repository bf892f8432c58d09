"""The training loop on the tiny recipe: exact resume, learning, S2/full switch, bad input."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness import checkpoint
from harness.recipe import load_recipe
from harness.resume import ResumeError
from harness.train import TrainError, train
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("session_cache")


def tiny(output_dir: Path, *overrides: str):
    return load_recipe("recipes/tiny_cpu.toml", [f"train.output_dir=\"{output_dir}\"", "train.save_every=0",
                                                 "data.max_seq_length=256", *overrides])


def losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def sigterm_at(stop: int):
    """An after_step callback that sends this process SIGTERM after step `stop`."""
    return lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == stop else None


def test_resume_after_sigterm_is_exact(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(tiny(straight, "train.max_steps=6", "train.save_every=3"))

    train(tiny(stopped, "train.max_steps=6", "train.save_every=3"), after_step=sigterm_at(3))
    assert [p.name for _, p in checkpoint.checkpoints(stopped)] == ["checkpoint-3"]
    assert not (stopped / "final").exists()
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
    assert rope["rope_parameters"]["rope_type"] == "yarn" and rope["rope_parameters"]["factor"] == 2.0
    assert rope["max_position_embeddings"] == 512 and rope["original_context"] == 256
    assert (final / "recipe.toml").is_file()
    base_dir = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final)
    loaded = {name.replace(".default.", "."): p.detach() for name, p in model.named_parameters() if "lora_" in name}
    saved = adapter(final)
    assert loaded.keys() == saved.keys() and len(saved) == 2 * 7 * 2  # A and B of 7 projections x 2 layers
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    assert all(saved[name].abs().max() > 0 for name in saved if "lora_B" in name)  # trained: B starts at zero


SEQ_LEN, GROUP = 256, 64  # the tiny recipe's attention.group_ratio = 0.25 of 256 tokens


def dense_s2_attention(module, query, key, value, attention_mask, *, scaling, **kwargs):
    """S2 written out densely for GROUP: query heads reading the first half of the KV heads attend
    within groups [0, G), [G, 2G), ...; the others within [0, G/2), [G/2, 3G/2), ... (shifted by
    half a group, no wrap-around); causal in both. A transformers attention function."""
    assert attention_mask is None or bool(attention_mask.all())
    heads, kv_heads, length = query.shape[1], key.shape[1], query.shape[2]
    per_kv = heads // kv_heads
    key, value = key.repeat_interleave(per_kv, dim=1), value.repeat_interleave(per_kv, dim=1)
    i = torch.arange(length)
    masks = []
    for h in range(heads):
        shift = GROUP // 2 if h // per_kv >= -(-kv_heads // 2) else 0
        group = (i + shift) // GROUP
        masks.append((i[None, :] <= i[:, None]) & (group[None, :] == group[:, None]))
    scores = (query @ key.transpose(-1, -2)) * scaling
    probs = scores.masked_fill(~torch.stack(masks), float("-inf")).softmax(dim=-1)
    return (probs @ value).transpose(1, 2), None


def test_s2_in_training_full_attention_in_eval(tmp_path):
    """The training model's attention: S2 with G = 0.25 x 256 = 64 in train mode (equal to the dense
    reference above), transformers' causal sdpa in eval mode. So the two modes agree exactly on the
    first G/2 positions, where every head's group is the causal prefix, and differ from position
    G/2 on, where the shifted heads' second group begins."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    from harness.model import build_model

    AttentionInterface.register("test_dense_s2", dense_s2_attention)
    AttentionMaskInterface.register("test_dense_s2", flash_attention_mask)
    model = build_model(tiny(tmp_path)).model
    assert model.config._attn_implementation == "harness_s2"
    for module in model.modules():  # no dropout, so only the attention pattern differs
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids = torch.randint(3, 260, (1, SEQ_LEN), generator=torch.Generator().manual_seed(0))

    def logits(implementation, training):
        model.set_attn_implementation(implementation)
        model.train(training)
        with torch.no_grad():
            return model(input_ids=ids).logits[0]

    # Eval first: bitsandbytes repacks the 4-bit weights for its CPU kernel on the first eval
    # forward, and every later forward (train mode too) then runs that same kernel.
    eval_logits, sdpa_logits = logits("harness_s2", False), logits("sdpa", False)
    train_logits, reference = logits("harness_s2", True), logits("test_dense_s2", True)
    torch.testing.assert_close(eval_logits, sdpa_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(train_logits, reference, rtol=1e-5, atol=1e-5)
    difference = (train_logits - eval_logits).abs().amax(dim=-1)
    assert difference[: GROUP // 2].max() < 1e-5, difference[: GROUP // 2]
    assert difference[GROUP // 2:].min() > 1e-3, difference[GROUP // 2:]


ANGLER = ROOT / "recipes" / "data" / "the_complete_angler_excerpt.txt"  # shipped with the repo


def test_qlora_s2_learns_real_text(tmp_path):
    """40 steps of 2 x 256 bytes of the shipped excerpt. The loss starts at ln(260) = 5.56 (random
    model; step-to-step noise ~0.03) and falls to ~5.16 (measured: first five steps 5.50 on average,
    last five 5.16; with the frozen random embeddings and head it levels off near 5.1)."""
    steps, batch = 40, 2
    text = ANGLER.read_bytes()
    # One token per byte: the run reads 40 x 2 x 256 = 20 480 bytes, so within one epoch of the
    # excerpt (10% spare for the document boundaries): no sample is seen twice.
    assert len(text) >= 1.1 * steps * batch * SEQ_LEN, len(text)
    train(tiny(tmp_path, f"data.path=\"{ANGLER}\"", f"train.max_steps={steps}", "train.grad_accum=1",
               f"train.micro_batch_size={batch}"))
    curve = losses(tmp_path)
    assert len(curve) == steps
    first, last = curve[:5], curve[-5:]
    assert sum(last) / 5 < sum(first) / 5 - 0.25, curve  # ~8x the noise; 0.33 measured
    assert max(last) < min(first), curve


def test_existing_run_is_refused(tmp_path):
    train(tiny(tmp_path, "train.max_steps=1"))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ResumeError, match="already holds a run.*--resume.*overwrite=true"):
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


# --------------------------------------------------------------------------- long-context evaluation

def metric_rows(output_dir: Path, key: str) -> list[dict]:
    return [r for r in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


HELD_OUT = 'data.eval_path="recipes/data/books/the_complete_angler.txt"'


def test_held_out_perplexity_at_target_and_window_every_n_steps_and_at_the_end(tmp_path, capsys):
    from harness import rundir

    out = tmp_path / "run"
    train(tiny(out, "data.max_seq_length=512", "train.max_steps=5", "train.eval_every=2", "train.eval_batches=2",
               "train.eval_s2=true", "train.save_every=2", "train.keep_checkpoints=1", HELD_OUT))
    rows = metric_rows(out, "eval_ppl")
    assert [r["step"] for r in rows] == [2, 4, 5]  # every 2 steps, and the last
    assert all({"eval_loss", "eval_ppl", "eval_ppl_window", "eval_ppl_s2"} <= r.keys() for r in rows)
    best = min(rows, key=lambda r: r["eval_ppl"])
    saved = rundir.read_recipe(out / "final").resolved
    assert (saved.best_eval_step, saved.best_eval_ppl) == (best["step"], pytest.approx(best["eval_ppl"]))
    err = " ".join(capsys.readouterr().err.split())
    assert "step 2: held-out perplexity" in err and "at 512 tokens (full attention)" in err
    assert "in windows of 256" in err
    assert f"Best held-out perplexity at 512 tokens (full attention): {best['eval_ppl']:.2f}" in err


def test_eval_every_without_held_out_data_says_how_to_get_it(tmp_path, capsys):
    train(tiny(tmp_path / "run", "train.max_steps=1", "train.eval_every=1", "train.eval_holdout=0"))
    err = " ".join(capsys.readouterr().err.split())
    assert "train.eval_every = 1 but there is no held-out data: set data.eval_path or data.eval_fraction" in err


def test_rising_full_attention_perplexity_warns_and_eval_stop_stops_the_run(tmp_path, capsys, monkeypatch):
    """The watch on a scripted evaluation (full-attention perplexity that keeps rising); the training
    loss of the tiny recipe falls over its first steps."""
    from harness.evaluation.in_training import LongContextEval

    scripted = iter([7.0, 7.5, 8.0, 8.5, 9.0])
    monkeypatch.setattr(LongContextEval, "run", lambda self, module, samples: {"eval_loss": 0.0,
                                                                              "eval_ppl": next(scripted)})
    out = tmp_path / "run"
    train(tiny(out, "train.max_steps=10", "train.eval_every=2", "train.eval_stop=true", "position.name=\"linear\"",
               HELD_OUT))
    assert losses(out)[5] < losses(out)[0]
    err = " ".join(capsys.readouterr().err.split())
    assert "step 6: full-attention perplexity at 256 tokens rose 7.00 -> 7.50 -> 8.00 over steps 2-6" in err
    assert "adapters trained this way broke under full attention past their S2 group" in err
    assert "Stopped by train.eval_stop" in err
    assert not (out / "final").exists()  # the best evaluation's checkpoint is kept beside the stop's
    assert [p.name for _, p in checkpoint.checkpoints(out)] == ["checkpoint-2", "checkpoint-6"]


def test_torch_save_failing_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """torch.save reports a full disk as a RuntimeError from its stream writer, not an OSError."""
    import harness.backends.accelerate_engine as engine_module

    real = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return real(obj, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_module.torch, "save", full_disk)
        with pytest.raises(TrainError, match=r"could not write checkpoint .*checkpoint-4: writing failed \(Pytorch"
                                             r"StreamWriter failed writing file data/0: file write failed\); the "
                                             r"previous checkpoint .*checkpoint-2 is intact\. Free disk space \(a "
                                             r"checkpoint takes about [\d.]+ KiB, [\d.]+ GiB free on .*\) and resume "
                                             r"with --resume"):
            train(tiny(tmp_path, "train.max_steps=6", "train.save_every=2"))
    assert [p.name for _, p in checkpoint.checkpoints(tmp_path)] == ["checkpoint-2"]
    assert not list(tmp_path.glob(".checkpoint-*"))  # the temporary folder is removed
    train(tiny(tmp_path, "train.max_steps=6", "train.save_every=2", "train.resume=\"auto\""))  # space freed: resumes
    assert (tmp_path / "final").is_dir()


def test_progress_prints_plain_lines_where_the_output_is_no_terminal():
    import io

    from rich.console import Console

    from harness.progress import Progress

    out = io.StringIO()
    record = {"loss": 2.5, "lr": 1e-3, "tokens_per_s": 1234.0, "peak_memory_gib": 1.5}
    with Progress(Console(file=out, width=200), total=3, start=0, plain_every_s=0) as progress:
        for step in (1, 2, 3):
            progress.update(step, record)
    lines = out.getvalue().splitlines()
    assert lines == [f"train {step}/3  loss 2.5000  lr 1.00e-03  1234 tok/s  mem 1.50 GiB" for step in (1, 2, 3)]
    quiet = io.StringIO()
    with Progress(Console(file=quiet, width=200), total=3, start=0, plain_every_s=3600) as progress:
        for step in (1, 2, 3):
            progress.update(step, record)
    assert quiet.getvalue().splitlines() == ["train 3/3  loss 2.5000  lr 1.00e-03  1234 tok/s  mem 1.50 GiB"]
