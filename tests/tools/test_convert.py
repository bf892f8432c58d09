"""tools/convert.py: merge round trip of a trained tiny adapter, --verify, ZeRO -> adapter, bad input.

One 2-step QLoRA run of recipes/tiny_cpu.toml (trainable embeddings and norms on) is shared by
the merge tests; one 2-rank DeepSpeed ZeRO-2 run (checkpoint-1 saved) by the ZeRO tests.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.convert import (ConvertError, VerifyError, adapter_state_dict, main, merge, nf4_round_trip,
                             verify_merged, zero_to_adapter)
from harness.recipe import load_recipe
from tests.conftest import ROOT, tiny_llama_config

VENV_BIN = Path(sys.executable).parent
RUN = ["train.max_steps=2", "data.max_seq_length=256", "adapter.trainable_embeddings=true",
       "adapter.trainable_norms=true"]
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@contextmanager
def in_repo(cache: Path):
    """cwd = repo root and the shared base-model cache, for module-scoped fixtures too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HARNESS_CACHE", str(cache))
        patch.setenv("TQDM_DISABLE", "1")  # what main() sets; kept from leaking into other tests
        patch.setenv("TRANSFORMERS_VERBOSITY", "error")
        patch.chdir(ROOT)
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "harness-cache"  # the one tests/recipes uses too


@pytest.fixture(autouse=True)
def _env(cache):
    with in_repo(cache):
        yield


@pytest.fixture(scope="module")
def final(tmp_path_factory, cache) -> Path:
    """final/ of a 2-step tiny QLoRA run with trainable embeddings and norms."""
    from harness.train import train

    output_dir = tmp_path_factory.mktemp("run")
    with in_repo(cache):
        train(load_recipe("recipes/tiny_cpu.toml", [f"train.output_dir=\"{output_dir}\"", "train.save_every=0", *RUN]))
    return output_dir / "final"


@pytest.fixture(scope="module")
def merged(final, tmp_path_factory, cache):
    """The fp32 merge (NF4 round-trip base) of `final`, verified."""
    with in_repo(cache):
        return merge(final, tmp_path_factory.mktemp("merged") / "model", dtype="fp32", verify=True)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def sample_ids(length: int) -> torch.Tensor:
    return torch.randint(3, 260, (2, length), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- merge

def test_merge_round_trip_matches_the_trained_model(final, merged):
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.model import load_for_eval
    from harness.tokenizer import byte_tokenizer

    out = merged.out
    assert merged.verification.max_abs_diff <= merged.verification.tolerance
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 2.0
    assert config["max_position_embeddings"] == 512 and "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out)("fish").input_ids == byte_tokenizer()("fish").input_ids

    # modules_to_save: the trained embeddings and norms are the merged model's own
    adapter = load_file(str(final / "adapter_model.safetensors"))
    weights = dict(model.named_parameters())
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        torch.testing.assert_close(weights[name], adapter[f"base_model.model.{name}"], rtol=0, atol=0)

    # The trained model itself: 4-bit NF4 base + the unmerged adapter, past the original 256 tokens.
    # bitsandbytes' CPU inference kernel (AVX512-BF16, used outside training) computes in bf16;
    # training used the dequantize-then-matmul path, which this flag selects.
    trained, _, _ = load_for_eval("", adapter=str(final), load_in_4bit=True)
    for module in trained.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    ids = sample_ids(300)
    expected = logits(trained, ids)
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_cli_merges_bf16_and_into_original_weights(final, merged, tmp_path, capsys):
    from harness.base_model import materialize

    assert main(["merge", str(final), str(tmp_path / "bf16"), "--verify"]) == 0
    table = capsys.readouterr().out
    assert "verified" in table and "linear factor 2.0" in table and "NF4 round trip" in table
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()} == {torch.bfloat16}

    assert main(["merge", str(final), str(tmp_path / "orig"), "--dtype", "fp32", "--base-weights", "original",
                 "--verify"]) == 0
    recipe = load_recipe("recipes/tiny_cpu.toml", RUN)
    base_dir = materialize("random", init_config=recipe.model.init_config, init_seed=recipe.model.init_seed)
    base = load_file(str(Path(base_dir) / "model.safetensors"))
    original = load_file(str(tmp_path / "orig" / "model.safetensors"))[Q_PROJ]
    dequantized = load_file(str(merged.out / "model.safetensors"))[Q_PROJ]
    assert not torch.equal(original, dequantized)  # NF4's rounding error separates the two regimes
    # ... and only it: the same LoRA delta B A * alpha / r was added to both
    nf4_base = nf4_round_trip(base[Q_PROJ], double_quant=True, dtype=torch.float32)
    torch.testing.assert_close(original - base[Q_PROJ], dequantized - nf4_base, rtol=0, atol=1e-6)


def test_verify_detects_a_wrong_merged_model(final, merged, tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(merged.out, corrupt)
    weights = load_file(str(corrupt / "model.safetensors"))
    weights[Q_PROJ] = weights[Q_PROJ] + 0.05
    save_file(weights, str(corrupt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VerifyError, match=r"max \|diff\| .* > tolerance"):
        verify_merged(corrupt, final)

    # The CLI: exit 1, one message with the numbers, and no half-verified OUT left behind.
    assert main(["merge", str(final), str(tmp_path / "strict"), "--verify", "--tolerance", "1e-9"]) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after library output (in-process only)
    assert message.startswith("convert.py: verification failed:") and "tolerance" in message
    assert not (tmp_path / "strict").exists()


# --------------------------------------------------------------------------- ZeRO -> adapter

def deepspeed_run(output_dir: Path, cache: Path, config: str, *overrides: str) -> Path:
    """2-rank DeepSpeed training of the tiny recipe on the CPU; returns checkpoint-1."""
    from harness.base_model import materialize

    with in_repo(cache):  # build the base once: two ranks building it together race in the cache
        recipe = load_recipe("recipes/tiny_cpu.toml", RUN)
        materialize("random", init_config=recipe.model.init_config, init_seed=recipe.model.init_seed)
    env = {**os.environ, "HARNESS_CACHE": str(cache), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29561", "launch/train.py",
               "recipes/tiny_cpu.toml", f"train.output_dir=\"{output_dir}\"", *RUN, "train.save_every=1",
               "train.grad_accum=1", "engine.name=\"deepspeed\"", f"engine.deepspeed_config=\"{config}\"", *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return output_dir / "checkpoint-1"


@pytest.fixture(scope="module")
def zero2_checkpoint(tmp_path_factory, cache) -> Path:
    return deepspeed_run(tmp_path_factory.mktemp("zero2") / "run", cache, "launch/deepspeed/zero2_offload.json")


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


# --------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """A tiny LLaMA of another width: the adapter's shapes do not fit it."""
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("other") / "base"
    LlamaForCausalLM(tiny_llama_config(hidden_size=32, intermediate_size=64)).save_pretrained(path)
    return path


def no_rope(final: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "no-rope"
    shutil.copytree(final, copy)
    (copy / "rope_parameters.json").unlink()
    return copy


def existing_out(tmp_path: Path) -> Path:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    return tmp_path / "taken"


BAD = {
    "missing adapter": (lambda f, t, o: ["merge", str(t / "nope"), str(t / "o")], "no such adapter"),
    "no deepspeed files": (lambda f, t, o: ["zero-to-adapter", str(f), str(t / "o")], "no DeepSpeed checkpoint"),
    "non-numeric tolerance": (lambda f, t, o: ["merge", str(f), str(t / "o"), "--tolerance", "tight"],
                              "'tight' is not a number"),
    "unknown dtype": (lambda f, t, o: ["merge", str(f), str(t / "o"), "--dtype", "int4"], "invalid choice"),
    "missing rope file": (lambda f, t, o: ["merge", str(no_rope(f, t)), str(t / "o")],
                          "rope_parameters.json is missing"),
    "existing output": (lambda f, t, o: ["merge", str(f), str(existing_out(t))], "already exists"),
    "different base": (lambda f, t, o: ["merge", str(f), str(t / "o"), "--base", str(o)], "different base model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, final, other_base, tmp_path, cache):
    make_args, expected = BAD[case]
    command = [sys.executable, "tools/convert.py", *make_args(final, tmp_path, other_base)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HARNESS_CACHE": str(cache)})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("convert.py: error:") and expected in lines[0], result.stderr
