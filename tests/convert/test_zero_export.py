"""harness.zero_export: ZeRO-2/3 checkpoints -> PEFT adapter directories, and what it refuses."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.cli.convert import main
from harness.conversion import ConvertError
from harness.merge import merge
from harness.zero_export import adapter_state_dict, zero_to_adapter
from tests.conftest import tiny_llama_config
from tests.convert.runs import deepspeed_run


def assert_same_adapter(converted: Path, written_by_harness: Path) -> None:
    ours, theirs = (load_file(str(d / "adapter_model.safetensors")) for d in (converted, written_by_harness))
    assert ours.keys() == theirs.keys() and all(t.numel() > 0 for t in ours.values())
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)


def test_zero2_checkpoint_to_adapter(zero2_checkpoint, tmp_path):
    report = zero_to_adapter(zero2_checkpoint, tmp_path / "adapter")
    assert_same_adapter(tmp_path / "adapter", zero2_checkpoint)
    assert report.tensors == 34  # 14 linears x (A, B) + embeddings + 5 norms
    for name in ("adapter_config.json", "recipe.toml", "rope_parameters.json"):
        assert (tmp_path / "adapter" / name).read_bytes() == (zero2_checkpoint / name).read_bytes()


def test_bare_deepspeed_folder_with_a_recipe_elsewhere(zero2_checkpoint, tmp_path, capsys):
    """Only the DeepSpeed folder and recipe.toml: adapter config and rope are rebuilt from the recipe."""
    shutil.copytree(zero2_checkpoint / "deepspeed", tmp_path / "bare")
    (tmp_path / "recipe").mkdir()
    shutil.copy(zero2_checkpoint / "recipe.toml", tmp_path / "recipe")
    assert main(["zero-to-adapter", str(tmp_path / "bare"), str(tmp_path / "adapter"),
                 "--recipe", str(tmp_path / "recipe" / "recipe.toml")]) == 0
    assert "34 (fp32)" in capsys.readouterr().out
    assert_same_adapter(tmp_path / "adapter", zero2_checkpoint)
    rope = json.loads((tmp_path / "adapter" / "rope_parameters.json").read_text())
    assert rope == json.loads((zero2_checkpoint / "rope_parameters.json").read_text())
    rebuilt, saved = (json.loads((d / "adapter_config.json").read_text())
                      for d in (tmp_path / "adapter", zero2_checkpoint))
    for key in ("r", "lora_alpha", "peft_type", "task_type"):
        assert rebuilt[key] == saved[key]
    assert set(rebuilt["target_modules"]) == set(saved["target_modules"])
    assert set(rebuilt["modules_to_save"]) == set(saved["modules_to_save"])


def test_zero_checkpoint_of_another_recipe_is_refused(zero2_checkpoint, tmp_path):
    shutil.copytree(zero2_checkpoint / "deepspeed", tmp_path / "bare")
    recipe = re.sub(r"^r = 8$", "r = 4", (zero2_checkpoint / "recipe.toml").read_text(), flags=re.MULTILINE)
    (tmp_path / "recipe.toml").write_text(recipe)
    with pytest.raises(ConvertError, match=r"shape \(8, 64\).* expects \(4, 64\)"):
        zero_to_adapter(tmp_path / "bare", tmp_path / "adapter", recipe_file=tmp_path / "recipe.toml")
    assert not (tmp_path / "adapter").exists()


def test_an_empty_zero3_shard_is_refused():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        peft_model = get_peft_model(LlamaForCausalLM(tiny_llama_config()), LoraConfig(r=4, target_modules="all-linear"))
    weights = {f"model.{n}": torch.zeros(p.shape) for n, p in peft_model.named_parameters() if p.requires_grad}
    weights["model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.empty(0)
    with pytest.raises(ConvertError, match="q_proj.lora_A.default.weight came out empty"):
        adapter_state_dict(peft_model, weights, where="ckpt")


@pytest.mark.slow
def test_zero3_checkpoint_to_adapter_and_merge(tmp_path, cache):
    checkpoint = deepspeed_run(tmp_path / "run", cache, "launch/deepspeed/zero3.json", "quantization.name=\"none\"")
    zero_to_adapter(checkpoint, tmp_path / "adapter")
    assert_same_adapter(tmp_path / "adapter", checkpoint)
    report = merge(tmp_path / "adapter", tmp_path / "merged", dtype="fp32", verify=True)
    assert report.notes[-1] == "base weights: original (trained unquantized)"
