"""Model families beyond LLaMA, on tiny random models of transformers' own classes.

Each family is the tiny recipe (recipes/tiny_cpu.toml: hidden 64, 2 layers, the byte vocabulary)
with `model.init_config.model_type` and the settings that make the family what it is:

    llama3       Llama-3.x: llama3 rope, 8 KV heads (16 query heads)
    mistral      Mistral: a sliding window (64 tokens: the S2 group at 256, a quarter of the sequence)
    qwen2        Qwen2.5: q/k/v biases, 28 heads over 4 KV heads (7 per KV head), a yarn rope
    qwen3        Qwen3: q/k norms, an explicit head_dim, 10 heads over 5 KV heads (an odd count)
    gemma3_text  Gemma-3: alternating sliding (64) / full layers with one rope table per layer type,
                 q/k norms, query_pre_attn_scalar scaling, MQA, tied embeddings
    phi3         Phi-3: fused qkv_proj and gate_up_proj, MHA, a longrope rope

Every family has a native (non-default) rope, so PI and YaRN need position.override_native.
Gemma-2 (soft-capped attention) is refused by S2 (test_soft_capped_attention_is_refused_by_s2).
"""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.recipe import RecipeError, load_recipe
from tests.conftest import ROOT, dequantized_copy, in_repo, is_4bit

YARN = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 256}
FAMILIES = {
    "llama3": {"model_type": "llama", "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 8,
               "max_position_embeddings": 2048,
               "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 256}},
    "mistral": {"model_type": "mistral", "sliding_window": 64, "max_position_embeddings": 1024,
                "rope_parameters": YARN},
    "qwen2": {"model_type": "qwen2", "hidden_size": 112, "num_attention_heads": 28, "num_key_value_heads": 4,
              "max_position_embeddings": 1024, "rope_parameters": YARN},
    "qwen3": {"model_type": "qwen3", "num_attention_heads": 10, "num_key_value_heads": 5, "head_dim": 8,
              "max_position_embeddings": 1024, "rope_parameters": YARN},
    "gemma3_text": {"model_type": "gemma3_text", "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
                    "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"],
                    "tie_word_embeddings": True, "max_position_embeddings": 1024,
                    "rope_parameters": {"full_attention": YARN,
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "phi3": {"model_type": "phi3", "num_key_value_heads": 4, "max_position_embeddings": 1024,
             "original_max_position_embeddings": 256,
             "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                 "long_factor": [4.0] * 8}},
}
GEMMA2 = {"model_type": "gemma2", "head_dim": 16}  # attn_logit_softcapping = 50 by default
NAMES = list(FAMILIES)
# Training runs cost seconds each: by default Phi-3 (fused projections, longrope) and Gemma-3 (rope per
# layer type, windows, MQA, tied head), the two furthest from LLaMA; --runslow trains every family.
TRAINED = [name if name in ("phi3", "gemma3_text") else pytest.param(name, marks=pytest.mark.slow) for name in NAMES]
SEQ_LEN, GROUP = 256, 64  # data.max_seq_length and the S2 group (group_ratio 0.25)
ANGLER = ROOT / "recipes" / "data" / "the_complete_angler_excerpt.txt"


def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + "}"
    return json.dumps(value)  # numbers, strings, booleans and lists read the same in TOML


def family(init: dict, *overrides: str, output_dir: Path | str = "runs/families"):
    """The tiny recipe on `init`'s family: PI x2 over its native rope, 256-token sequences."""
    settings = [f"model.init_config.{key}={toml_value(value)}" for key, value in init.items()]
    return load_recipe("recipes/tiny_cpu.toml", [*settings, "model.original_context=256",
                                                 "position.override_native=true", f"data.max_seq_length={SEQ_LEN}",
                                                 f"train.output_dir=\"{output_dir}\"", *overrides])


pytestmark = pytest.mark.usefixtures("session_cache")


def ids(length=SEQ_LEN, seed=0):
    return torch.randint(3, 260, (1, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- random bases, recipes

@pytest.mark.parametrize("name", NAMES + ["gemma2"])
def test_random_base_is_the_family_class(name):
    from transformers import AutoModelForCausalLM

    from harness.base_model import materialize

    recipe = family(FAMILIES.get(name, GEMMA2))
    model = AutoModelForCausalLM.from_pretrained(materialize("random", init_config=recipe.model.init_config))
    expected = {"llama3": "Llama", "gemma3_text": "Gemma3", "gemma2": "Gemma2", "qwen2": "Qwen2", "qwen3": "Qwen3",
                "mistral": "Mistral", "phi3": "Phi3"}[name]
    assert type(model).__name__ == f"{expected}ForCausalLM"
    assert model.config.vocab_size == 260 and model.config.num_hidden_layers == 2


def test_a_llama_table_without_model_type_keeps_its_cache_entry():
    """Caches built before model_type existed stay valid: the key hashes init_config as written."""
    import hashlib

    from harness.base_model import materialize

    recipe = load_recipe("recipes/tiny_cpu.toml")
    key = hashlib.sha256(json.dumps([recipe.model.init_config, 0], sort_keys=True).encode()).hexdigest()[:16]
    path = Path(materialize("random", init_config=recipe.model.init_config))
    assert path.name == key and json.loads((path / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("override,message", [
    ('model.init_config.model_type="qwen25"', "model_type = 'qwen25' is not a causal-LM family of transformers. "
                                              "Did you mean 'qwen2'? Known: "),
    ('model.init_config.model_type="phi3"', None),  # tiny_cpu's keys are all Phi3Config fields
    ('model.init_config.sliding_window="64"', "model.init_config.sliding_window = '64' has type str, expected int"),
])
def test_init_config_is_checked_against_its_family(override, message):
    overrides = ['model.init_config.model_type="mistral"', override]
    if message is None:
        load_recipe("recipes/tiny_cpu.toml", overrides)
        return
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_recipe("recipes/tiny_cpu.toml", overrides)


def test_a_key_the_family_lacks_names_its_config_class():
    with pytest.raises(RecipeError, match="unknown key model.init_config.head_dim: Phi3Config has no such field"):
        load_recipe("recipes/tiny_cpu.toml", ['model.init_config.model_type="phi3"', "model.init_config.head_dim=16"])


# --------------------------------------------------------------------------- NF4, LoRA

def linear_names(model) -> set[str]:
    """Every projection of the decoder layers (the lm_head stays out of QLoRA)."""
    return {name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in name}


@pytest.mark.parametrize("name", NAMES)
def test_nf4_base_and_lora_on_every_linear_layer(name):
    from harness.backends.adapter import lora_adapter
    from harness.model import build_model

    recipe = family(FAMILIES[name], 'attention.name="full"')
    nf4 = build_model(recipe, training=False, with_adapter=False).model
    plain = dequantized_copy(nf4)
    quantized = {n for n, m in nf4.named_modules() if is_4bit(m)}
    assert quantized == linear_names(plain) and len(quantized) == 2 * (4 if name == "phi3" else 7)
    with torch.no_grad():  # train mode: bitsandbytes' eval-time CPU repacking would compute differently
        torch.testing.assert_close(nf4.train()(input_ids=ids(96)).logits, plain(input_ids=ids(96)).logits,
                                   atol=1e-5, rtol=1e-5)
    lora = lora_adapter(nf4, r=8, target_modules=["all-linear"])  # what adapter.name = "lora" applies
    adapted = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
               for n, _ in lora.named_modules() if n.endswith(".lora_A.default")}
    assert adapted == quantized  # Phi-3: the fused qkv_proj and gate_up_proj too
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


# --------------------------------------------------------------------------- S2

def dense_s2_attention(module, query, key, value, attention_mask, *, scaling, sliding_window=None, **kwargs):
    """S2 over GROUP written out densely, as a transformers attention function: a query head is
    shifted by G/2 iff its KV head is in the second half of the KV heads (MQA: iff it is in the
    second half of the query heads); causal; and inside the layer's sliding window, if any."""
    assert attention_mask is None or bool(attention_mask.all())
    heads, kv_heads, length = query.shape[1], key.shape[1], query.shape[2]
    key, value = key.repeat_interleave(heads // kv_heads, dim=1), value.repeat_interleave(heads // kv_heads, dim=1)
    i = torch.arange(length)
    masks = []
    for h in range(heads):
        second = h >= -(-heads // 2) if kv_heads == 1 else h // (heads // kv_heads) >= -(-kv_heads // 2)
        group = (i + (GROUP // 2 if second else 0)) // GROUP
        allowed = (i[None, :] <= i[:, None]) & (group[None, :] == group[:, None])
        masks.append(allowed & (i[:, None] - i[None, :] < sliding_window) if sliding_window else allowed)
    scores = (query @ key.transpose(-1, -2)) * scaling
    probs = scores.masked_fill(~torch.stack(masks), float("-inf")).softmax(dim=-1)
    return (probs @ value).transpose(1, 2), None


@pytest.mark.parametrize("name", NAMES)
def test_s2_equals_the_dense_reference_in_training_and_full_attention_in_eval(name):
    """Train mode: harness_s2 = the dense reference above (the module's scaling, its q/k norms, its
    window). Eval mode: harness_s2 = transformers' sdpa with its own masks; Mistral's and Gemma-3's
    64-token windows bind at 256 tokens there. Full-precision base, so only attention differs."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    from harness.model import build_model

    AttentionInterface.register("test_family_dense_s2", dense_s2_attention)
    AttentionMaskInterface.register("test_family_dense_s2", flash_attention_mask)
    model = build_model(family(FAMILIES[name], 'quantization.name="none"', 'adapter.name="none"'),
                        training=False, with_adapter=False).model
    assert model.config._attn_implementation == "harness_s2"

    def logits(implementation, training):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            return model.train(training)(input_ids=ids()).logits[0]

    s2, reference = logits("harness_s2", True), logits("test_family_dense_s2", True)
    torch.testing.assert_close(s2, reference, rtol=1e-5, atol=1e-5)
    full = logits("harness_s2", False)
    torch.testing.assert_close(full, logits("sdpa", False), rtol=1e-5, atol=1e-5)
    difference = (s2 - full).abs().amax(dim=-1)  # equal while every group is the causal prefix, then not
    assert difference[: GROUP // 2].max() < 1e-5 and difference[GROUP // 2:].min() > 1e-4


def test_soft_capped_attention_is_refused_by_s2_and_runs_eager_in_full():
    from harness.model import build_model

    with pytest.raises(RecipeError, match=r'attention.name = "s2" cannot run gemma2: its attention soft-caps the '
                                          r'logits \(attn_logit_softcapping = 50.0\).*Use attention.name = "full"'):
        build_model(family(GEMMA2), training=False, with_adapter=False)
    built = build_model(family(GEMMA2, 'attention.name="full"'), training=False, with_adapter=False)
    assert built.attention_implementation == "eager"  # transformers' sdpa raises on a soft-cap
    assert torch.isfinite(built.model(input_ids=ids(96)).logits).all()


def test_a_window_shorter_than_the_group_is_refused():
    from harness.backends.attention import AttentionError
    from harness.model import build_model

    narrow = {**FAMILIES["mistral"], "sliding_window": 32}
    model = build_model(family(narrow), training=False, with_adapter=False).model
    with pytest.raises(AttentionError, match=r"mistral attends within a sliding window of 32 tokens "
                                             r"\(sliding_window = 32\), shorter than the S2 group of 64 tokens.*"
                                             r"attention.group_size to at most 32"):
        model.train()(input_ids=ids())
    model.eval()(input_ids=ids())  # full attention in eval applies the window: fine
    with pytest.raises(RecipeError, match="sliding window of 32 tokens"):  # a fixed group is refused at build
        build_model(family(narrow, "attention.group_size=64"), training=False, with_adapter=False)


# --------------------------------------------------------------------------- training, resume, merge, eval

def losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def sigterm_at(stop: int):
    return lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == stop else None


RUN = ("train.max_steps=3", "train.save_every=2", "train.grad_accum=1", "data.max_seq_length=128")  # S2 groups of 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """name -> the run directory of 3 training steps of that family (built once per module)."""
    from harness.train import train

    runs = {}

    def run(name: str) -> Path:
        if name not in runs:
            output = tmp_path_factory.mktemp(name) / "straight"
            with in_repo(cache):
                train(family(FAMILIES[name], *RUN, output_dir=output))
            runs[name] = output
        return runs[name]

    return run


@pytest.mark.parametrize("name", TRAINED)
def test_three_steps_and_an_exact_resume(name, trained, tmp_path):
    from harness.train import train

    straight = trained(name)
    first = losses(straight)
    assert len(first) == 3 and all(math.isfinite(loss) for loss in first)
    stopped = tmp_path / "stopped"
    train(family(FAMILIES[name], *RUN, output_dir=stopped), after_step=sigterm_at(2))
    assert not (stopped / "final").exists()
    train(family(FAMILIES[name], *RUN, 'train.resume="auto"', output_dir=stopped))
    assert losses(stopped) == first  # 2 before the stop + 1 after, bit for bit
    a, b = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (straight, stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert any(b[key].abs().max() > 0 for key in b if "lora_B" in key)  # it trained


@pytest.mark.parametrize("name", TRAINED)
def test_merge_verifies_and_eval_ppl_scores_it_like_the_adapter(name, trained, tmp_path, capsys):
    """convert merge --verify into the original fp32 weights, then eval_ppl of the merged model (a
    plain transformers directory: its config.json carries the rope) equals eval_ppl of base + adapter
    (rebuilt from the run's recipe)."""
    from harness.cli.convert import main as convert
    from harness.cli.eval_ppl import main as eval_ppl

    final = trained(name) / "final"
    merged = tmp_path / "merged"
    assert convert(["merge", str(final), str(merged), "--verify", "--dtype", "fp32", "--base-weights", "original"]) == 0
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    common = ["--data", str(ANGLER), "--seq-lens", "256", "--max-tokens", "768", "--json", str(tmp_path / "ppl.json")]
    assert eval_ppl(["--model", base, "--adapter", str(final), "--model", str(merged), "--adapter", "none",
                     "--tokenizer", "builtin:bytes", *common]) == 0
    adapter_row, merged_row = json.loads((tmp_path / "ppl.json").read_text())["results"]
    assert adapter_row["tokens"] == merged_row["tokens"] > 0
    assert merged_row["ppl"] == pytest.approx(adapter_row["ppl"], rel=1e-4)
    assert 100 < adapter_row["ppl"] < 400  # a random byte model near uniform over 260 symbols


# --------------------------------------------------------------------------- the planner's shape

@pytest.mark.parametrize("name", NAMES)
def test_planner_shape_is_the_model_s(name):
    """ModelShape from the init_config (the family's defaults filling the rest) against the real model:
    each linear layer's (in, out) by name, head dims, vocabulary, tied embeddings, LoRA parameters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from harness.base_model import config_from_dict
    from harness.memory import ALL_LINEAR, lora_params, model_shape, plan

    recipe = family(FAMILIES[name])
    shape = model_shape(recipe)
    model = AutoModelForCausalLM.from_config(config_from_dict(recipe.model.init_config))
    layer = {n.split(".")[-1]: (m.in_features, m.out_features) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.0.")}
    assert shape.linears() == layer
    attention = model.model.layers[0].self_attn
    assert shape.head_dim == attention.head_dim and (shape.vocab, shape.layers) == (260, 2)
    assert shape.tied == (model.lm_head.weight is model.model.embed_tokens.weight) == (name == "gemma3_text")
    peft = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    assert lora_params(shape, ALL_LINEAR, 8) == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert plan(recipe, device="cpu").peak_bytes > 0


NEW_RECIPES = ["llama3_8b_32k", "mistral_7b_v0_3_64k", "qwen2_5_7b_128k_yarn"]


@pytest.mark.parametrize("stem", NEW_RECIPES)
def test_modern_recipes_plan_offline_with_their_published_shapes(stem):
    from harness.memory import plan

    recipe = load_recipe(f"recipes/{stem}.toml")
    result = plan(recipe, card="rtx4090-24gb")
    assert result.shape.source.startswith("built-in shape of") and result.max_seq_len > 0
    published = {"llama3_8b_32k": (128256, 4096, 8), "mistral_7b_v0_3_64k": (32768, 4096, 8),
                 "qwen2_5_7b_128k_yarn": (152064, 3584, 4)}[stem]
    assert (result.shape.vocab, result.shape.hidden, result.shape.kv_heads) == published
