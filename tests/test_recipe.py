"""Recipes: every shipped recipe resolves offline; each bad recipe gets its message."""
from __future__ import annotations

import subprocess
import sys

import pytest

from harness.recipe import RecipeError, load_recipe, read_saved_recipe, save_recipe
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.toml"))


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch/train.py", *args, "--dry-run"], cwd=ROOT, capture_output=True, text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_resolves_through_dry_run(recipe):
    result = dry_run(str(recipe.relative_to(ROOT)))
    assert result.returncode == 0, result.stderr
    assert "resolved.rope_factor" in result.stdout


# recipe -> (rope factor, training length, S2 group): ceil(target / original window) and a quarter of the
# length, worked out by hand from each file (qwen2.5 trains 48k of its 128k target; the pretraining
# recipe extends nothing and runs full attention; the PoSE recipe trains an 8k window of its 64k target
# with full attention).
RESOLVED = {
    "llama2_13b_12k": (3.0, 12288, 3072), "llama2_13b_8k": (2.0, 8192, 2048), "llama2_7b_8k": (2.0, 8192, 2048),
    "llama3_8b_32k": (4.0, 32768, 8192), "llama3_8b_64k_pose": (8.0, 8192, 0),
    "mistral_7b_v0_3_64k": (2.0, 65536, 16384),
    "qwen2_5_7b_128k_yarn": (4.0, 49152, 12288), "smollm2_135m_16k": (2.0, 16384, 4096),
    "testbed_longqlora": (4.0, 1024, 256), "testbed_pretrain": (0.0, 256, 0), "tiny_cpu": (2.0, 512, 128),
    "vicuna_13b_8k_sft": (2.0, 8192, 2048),
}


def test_every_recipe_has_its_resolved_values_written_down():
    assert sorted(RESOLVED) == [recipe.stem for recipe in RECIPES]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipes_resolve_the_paper_settings(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)
    loaded = load_recipe(recipe)
    resolved = loaded.resolved
    assert (resolved.rope_factor, resolved.seq_len, resolved.group_size) == RESOLVED[recipe.stem]
    if recipe.stem.startswith(("llama2", "vicuna")):  # the paper's reproductions
        assert (loaded.adapter.r, loaded.adapter.alpha, loaded.adapter.dropout) == (64, 16, 0.05)
        assert loaded.adapter.target_modules == ["all-linear"]
        assert (loaded.train.max_steps, loaded.train.grad_accum, loaded.train.max_grad_norm) == (1000, 16, 0.3)
        assert loaded.train.lr == (1e-4 if "sft" in recipe.stem else 2e-4)
        assert loaded.engine.name == "deepspeed" and "zero2_offload" in loaded.engine.deepspeed_config


def test_paper_recipes_keep_pi_and_modern_recipes_use_yarn(monkeypatch):
    monkeypatch.chdir(ROOT)
    position = {recipe.stem: load_recipe(recipe).position.name for recipe in RECIPES}
    assert {name for name, value in position.items() if value == "linear"} == {
        "llama2_7b_8k", "llama2_13b_8k", "llama2_13b_12k", "vicuna_13b_8k_sft"}
    assert {name for name, value in position.items() if value == "yarn"} == {
        "llama3_8b_32k", "llama3_8b_64k_pose", "mistral_7b_v0_3_64k", "qwen2_5_7b_128k_yarn", "smollm2_135m_16k",
        "testbed_longqlora", "tiny_cpu"}  # the README's first flow: the default pairing, no warning about itself


def test_pi_with_s2_prints_one_line_naming_the_measurement_and_the_alternative():
    lines = [line for line in dry_run("recipes/llama2_7b_8k.toml").stderr.splitlines() if "the paper's pairing" in line]
    assert len(lines) == 1 and lines[0].startswith("recipes/llama2_7b_8k.toml: position.name = \"linear\" with")
    assert "broke under full attention past their S2 group" in lines[0] and "position.name = \"yarn\"" in lines[0]
    for quiet in (["recipes/smollm2_135m_16k.toml"], ["recipes/llama2_7b_8k.toml", "attention.name=\"full\""],
                  ["recipes/llama2_7b_8k.toml", "attention.at_inference=true"]):
        assert "the paper's pairing" not in dry_run(*quiet).stderr, quiet


def test_llama2_13b_12k_stretches_its_4k_rope_over_12k_positions():
    """The paper's 13B run: PI from LLaMA-2's 4096 positions to 12288, checked where it acts: the linear
    backend edits LLaMA-2-13B's config as build_model has it do, and transformers computes the rope from
    that config itself. PI's definition (Chen et al. 2023): position p reads as p x 4096 / 12288, so every
    frequency is the original's x 4096 / 12288."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from harness.backends.position import linear_position

    recipe = load_recipe(ROOT / "recipes/llama2_13b_12k.toml")
    config = LlamaConfig(hidden_size=5120, num_attention_heads=40, max_position_embeddings=4096)  # LLaMA-2-13B
    original = LlamaRotaryEmbedding(config).inv_freq.double()
    applied = linear_position(config, target_length=recipe.position.target_length, factor=recipe.position.factor,
                              original_context=recipe.model.original_context)
    stretched = LlamaRotaryEmbedding(config).inv_freq.double()
    assert applied == recipe.resolved.rope_factor  # what the run reports is what the model runs
    torch.testing.assert_close(stretched, original * 4096 / 12288, rtol=1e-6, atol=0)


def test_overrides_are_typed_and_change_resolution(monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe("recipes/tiny_cpu.toml", ["train.grad_accum=4", "attention.group_size=64",
                                                     "model.init_config.hidden_size=32", "train.output_dir=x"])
    assert recipe.train.grad_accum == 4 and recipe.resolved.effective_batch_size == 4
    assert recipe.resolved.group_size == 64
    assert recipe.model.init_config["hidden_size"] == 32
    assert recipe.train.output_dir == "x"


def test_saved_recipe_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe("recipes/tiny_cpu.toml")
    save_recipe(recipe, tmp_path / "recipe.toml")
    again = read_saved_recipe(tmp_path / "recipe.toml")
    assert again == recipe


BAD = {
    "unknown key": (["train.lerning_rate=1"], "unknown key 'train.lerning_rate'"),
    "did you mean": (["atention.name=\"s2\""], "Did you mean 'attention'?"),
    "did you mean, in a table": (["layout.chunk=3"], "unknown key 'layout.chunk'. Did you mean 'layout.chunks'?"),
    "wrong type": (["train.max_steps=\"ten\""], "train.max_steps = 'ten' has type str, expected int"),
    "unknown backend": (["attention.name=\"s3\""], "attention.name = 's3' is not a known attention backend"),
    "short target": (["position.target_length=128"],
                     "position.target_length = 128 is shorter than the model's original context of 256"),
    "4-bit without adapter": (["adapter.name=\"none\""], "quantization.name = 'nf4' with adapter.name = \"none\""),
    "missing data file": (["data.path=\"no/such.txt\""], "data.path = 'no/such.txt': no such file or directory"),
    "deepspeed without config": (["engine.name=\"deepspeed\""],
                                 "engine.name = \"deepspeed\" needs engine.deepspeed_config"),
    "missing deepspeed config": (["engine.name=\"deepspeed\"", "engine.deepspeed_config=\"nope.json\""],
                                 "engine.deepspeed_config = 'nope.json': file not found"),
    "bad choice": (["train.scheduler=\"cosin\""], "Did you mean 'cosine'?"),
    "odd group": (["attention.group_size=33"], "attention.group_size = 33 must be even"),
    "group longer than the sequence": (["attention.group_size=1024"],
                                       "attention.group_size = 1024 is longer than the training sequence of 512"),
    "not a number": (["train.lr=abc"], "train.lr = 'abc' has type str, expected float (write a number, e.g. 2e-4)"),
    "quoted number": (["train.lr=\"0.1\""], "(write 0.1 without quotes)"),
    "init_config type": (["model.init_config.hidden_size=\"abc\""],
                         "model.init_config.hidden_size = 'abc' has type str, expected int"),
    "init_config key": (["model.init_config.hiden_size=64"], "Did you mean model.init_config.hidden_size?"),
    "data mode": (["data.mode=\"pak\""], "data.mode = 'pak' is not one of 'truncate', 'pack'. Did you mean 'pack'?"),
    "sft format": (["data.format=\"sharegtp\""], "data.format = 'sharegtp' is not one of 'auto', 'vicuna', "
                                                   "'sharegpt', 'messages'. Did you mean 'sharegpt'?"),
    "old and new name": (["train.cpu_cache_mb=64", "train.cpu_cache_mib=32"],
                         "train.cpu_cache_mb and train.cpu_cache_mib are both set: train.cpu_cache_mb is the old "
                         "name of train.cpu_cache_mib. Keep train.cpu_cache_mib only"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_recipe_gets_a_clear_error(name):
    overrides, message = BAD[name]
    result = dry_run("recipes/tiny_cpu.toml", *overrides)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert "recipes/tiny_cpu.toml" in result.stderr


def test_setting_without_effect_is_reported():
    result = dry_run("recipes/tiny_cpu.toml", "quantization.name=\"int8\"")
    assert result.returncode == 0
    assert "quantization.compute_dtype = 'fp32' has no effect with quantization.name = 'int8'" in result.stderr


def test_missing_recipe_file():
    result = dry_run("recipes/nope.toml")
    assert result.returncode == 2 and "recipe file not found: recipes/nope.toml" in result.stderr


def test_bad_override_syntax(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe("recipes/tiny_cpu.toml", ["max_steps"])


def test_invalid_toml_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(RecipeError, match="bad.toml: not valid TOML"):
        load_recipe(bad)


def test_the_old_cpu_cache_key_loads_and_warns_once_naming_the_new_one(monkeypatch, caplog):
    from harness import recipe as recipe_module

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(recipe_module, "_WARNED_RENAMES", set())
    loaded = [load_recipe("recipes/tiny_cpu.toml", ["train.cpu_cache_mb=64"]) for _ in range(2)]
    assert [recipe.train.cpu_cache_mib for recipe in loaded] == [64, 64]
    warnings = [record.getMessage() for record in caplog.records if "train.cpu_cache_mb" in record.getMessage()]
    assert warnings == ["recipes/tiny_cpu.toml: train.cpu_cache_mb is deprecated: rename it train.cpu_cache_mib "
                        "(the same setting)"]


def test_a_saved_recipe_of_an_old_run_loads_its_old_cpu_cache_key_silently(tmp_path, monkeypatch, caplog):
    """recipe.toml of a run from before train.cpu_cache_mib: read as the same recipe, no warning (it is a record)."""
    from harness import recipe as recipe_module

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(recipe_module, "_WARNED_RENAMES", set())
    recipe = load_recipe("recipes/tiny_cpu.toml", ["train.cpu_cache_mib=64"])
    save_recipe(recipe, tmp_path / "recipe.toml")
    old = tmp_path / "old.toml"
    old.write_text((tmp_path / "recipe.toml").read_text().replace("cpu_cache_mib = 64", "cpu_cache_mb = 64"))
    assert "cpu_cache_mb = 64" in old.read_text()
    assert read_saved_recipe(old) == recipe
    assert "cpu_cache" not in caplog.text
