"""harness.generation: greedy decoding against an argmax loop, base + adapter against the merged model,
the checkpoint's rope and window, the KV cache's size, streaming, stop strings, sampling and chat history."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from harness.evaluation.models import ModelSpec, load_model
from harness.evaluation.passkey import greedy_generate
from harness.generation import (Chat, GenerationError, Sampling, Window, cache_dtype, check_window, context_window,
                                encode_prompt, format_bytes, generate, kv_shape, new_token_budget)
from harness.rundir import read_rope
from tests.conftest import in_repo, tiny_llama_config
from tests.convert.runs import train_tiny

PROMPT = "It was a bright cold day in April, and the clocks were striking thirteen. "  # 74 byte tokens


# --------------------------------------------------------------------------- a trained tiny run

pytestmark = pytest.mark.usefixtures("session_cache")


def tiny_run(tmp_path_factory, cache) -> Path:
    """final/ of a 2-step tiny QLoRA run (PI x2 from 256 to 512 tokens, trainable embeddings and
    norms), trained once per session: this module and tests/cli/test_generate.py share it."""
    output = tmp_path_factory.getbasetemp() / "generation-run"
    if not (output / "final" / "manifest.json").is_file():  # written last
        train_tiny(output, cache)
    return output / "final"


def merged_run(final: Path, base_weights: str, cache) -> Path:
    """The adapter merged in fp32 into the original or the NF4 round-trip ("dequantized") base, once."""
    from harness.merge import merge

    out = final.parent / f"merged-{base_weights}"
    if not out.is_dir():  # merge writes it atomically
        with in_repo(cache):
            merge(final, out, dtype="fp32", base_weights=base_weights)
    return out


@pytest.fixture(scope="module")
def final(tmp_path_factory, cache):
    return tiny_run(tmp_path_factory, cache)


@pytest.fixture(scope="module")
def merged(final, cache):
    return {weights: merged_run(final, weights, cache) for weights in ("original", "dequantized")}


def argmax_loop(model, input_ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding by hand: the whole sequence through the model every step, no KV cache."""
    tokens = list(input_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
            if tokens[-1] == eos_id:
                break
    return tokens[len(input_ids):]


# --------------------------------------------------------------------------- greedy decoding

def test_greedy_generate_and_passkeys_path_equal_an_argmax_loop(tiny_model, byte_tokenizer):
    ids = byte_tokenizer(PROMPT).input_ids
    expected = argmax_loop(tiny_model, ids, 30, byte_tokenizer.eos_token_id)
    result = generate(tiny_model, byte_tokenizer, ids, Sampling(max_new_tokens=30))
    assert result.token_ids == expected and result.prompt_tokens == len(ids)
    assert result.text == byte_tokenizer.decode(expected, skip_special_tokens=True)
    assert greedy_generate(tiny_model, byte_tokenizer)(ids, 30) == result.text  # passkey's generate_fn


@pytest.mark.parametrize("base_weights,load_in_4bit", [("original", False), ("dequantized", True)])
def test_base_plus_adapter_greedy_equals_the_merged_model(final, merged, base_weights, load_in_4bit):
    from bitsandbytes.nn import Linear4bit

    trained, tokenizer, _ = load_model(ModelSpec("", adapter=str(final), load_in_4bit=load_in_4bit))
    for module in trained.modules():  # the dequantize-then-matmul path training used (not the bf16 CPU kernel)
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    merged_model, merged_tokenizer, _ = load_model(ModelSpec(str(merged[base_weights])))
    ids = encode_prompt(tokenizer, PROMPT * 4, template=False)  # 296 tokens: past the original 256
    assert ids == encode_prompt(merged_tokenizer, PROMPT * 4, template=False) and len(ids) == 296
    ours = generate(trained, tokenizer, ids, Sampling(max_new_tokens=40))
    theirs = generate(merged_model, merged_tokenizer, ids, Sampling(max_new_tokens=40))
    assert (ours.token_ids, ours.text) == (theirs.token_ids, theirs.text)
    assert theirs.token_ids == argmax_loop(merged_model, ids, 40, merged_tokenizer.eos_token_id)


# --------------------------------------------------------------------------- rope and window

def test_the_checkpoints_rope_is_applied_and_sets_the_window(final, merged):
    model, tokenizer, _ = load_model(ModelSpec("", adapter=str(final)))  # --adapter alone: base from the recipe
    saved = read_rope(final)
    assert model.config.rope_parameters == saved["rope_parameters"]
    assert saved["rope_parameters"]["factor"] == 2.0 and model.config.max_position_embeddings == 512
    window = context_window(model.config)
    assert window == Window(512, 256, "yarn x2")
    merged_model, _, _ = load_model(ModelSpec(str(merged["original"])))
    assert context_window(merged_model.config) == window  # config.json carries the same rope

    check_window(window, 400)  # past the original 256, inside the extended 512
    result = generate(model, tokenizer, encode_prompt(tokenizer, "x" * 400, template=False), Sampling(8))
    assert (result.prompt_tokens, result.cache_tokens) == (400, 400 + len(result.token_ids) - 1)
    with pytest.raises(GenerationError) as refused:
        check_window(window, 600)
    assert ("600 tokens" in str(refused.value) and "512 tokens" in str(refused.value)
            and "shorten it by at least 89 tokens" in str(refused.value))
    with pytest.raises(GenerationError, match="512 tokens, filling"):
        check_window(window, 512)
    assert new_token_budget(window, 500, 256) == 12 and new_token_budget(window, 100, 256) == 256


def test_window_of_every_rope_type():
    from harness.backends import position

    def window(edit, **settings):
        config = tiny_llama_config(max_position_embeddings=1024)
        edit(config, target_length=4096, **settings)
        return context_window(config)

    assert window(position.linear_position) == Window(4096, 1024, "linear x4")
    assert window(position.dynamic_position) == Window(4096, 1024, "dynamic x4")  # keeps 1024 in the config
    assert window(position.yarn_position) == Window(4096, 1024, "yarn x4")
    assert window(position.llama3_position) == Window(4096, 1024, "llama3 x4")
    assert window(position.no_position) == Window(1024, 1024, "default")
    assert Window(1024, 1024, "default").describe() == "1,024 tokens (default rope)"


# --------------------------------------------------------------------------- KV cache

def test_kv_cache_measured_equals_computed_in_smollm2s_attention_shape():
    from transformers import LlamaForCausalLM

    # SmolLM2-135M's attention (9 heads, 3 KV heads of 64 dims) in 2 layers, bf16 as on a GPU
    config = tiny_llama_config(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    from harness.tokenizer import byte_tokenizer

    result = generate(model, byte_tokenizer(), list(range(4, 104)), Sampling(max_new_tokens=5))
    assert cache_dtype(model) == torch.bfloat16 and result.cache_tokens == 100 + len(result.token_ids) - 1
    assert result.cache_bytes == 2 * 2 * 3 * 64 * result.cache_tokens * 2  # K and V, layers, heads, dims, bf16
    assert kv_shape(model.config).bytes(result.cache_tokens, 2) == result.cache_bytes


def test_kv_cache_of_smollm2_at_16k():
    from transformers import LlamaConfig

    from harness.memory import KNOWN_SHAPES

    shape = kv_shape(LlamaConfig(**KNOWN_SHAPES["HuggingFaceTB/SmolLM2-135M-Instruct"]))
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (30, 3, 64)
    assert shape.bytes(16384, 2) == 30 * 2 * 16384 * 3 * 64 * 2 == 377_487_360
    assert format_bytes(shape.bytes(16384, 2)) == "360.0 MiB" and format_bytes(shape.bytes(16384, 4)) == "720.0 MiB"
    assert shape.formula(16384, 2) == "2 x 30 layers x 3 KV heads x 64 dims x 16,384 tokens x 2 bytes"


# --------------------------------------------------------------------------- streaming, stop strings, sampling

def test_streamed_pieces_join_to_the_text_and_a_stop_string_ends_it(tiny_model, byte_tokenizer):
    ids = byte_tokenizer(PROMPT).input_ids
    pieces = []
    full = generate(tiny_model, byte_tokenizer, ids, Sampling(40), on_text=pieces.append)
    assert "".join(pieces) == full.text and len(full.token_ids) == 40
    stop = re.search(r"[ -~\n]{2}", full.text[1:]).group()  # two ASCII characters the model writes (not first)
    pieces = []
    stopped = generate(tiny_model, byte_tokenizer, ids, Sampling(40), on_text=pieces.append, stop=[stop])
    assert stopped.text == full.text[:full.text.index(stop)] == "".join(pieces)
    assert stopped.token_ids == full.token_ids[:len(stopped.token_ids)] and len(stopped.token_ids) < 40


def test_text_that_may_start_a_stop_string_waits_for_the_next_piece(tiny_model, byte_tokenizer):
    ids = byte_tokenizer(PROMPT).input_ids
    pieces = []
    full = generate(tiny_model, byte_tokenizer, ids, Sampling(40), on_text=pieces.append)
    assert len(pieces) > 1 and pieces[0].endswith("\n")  # the streamer flushes at a newline
    never = "\n\x00never written"  # begins with the newline that ends the first piece
    held = []
    again = generate(tiny_model, byte_tokenizer, ids, Sampling(40), on_text=held.append, stop=[never])
    assert held[0] == pieces[0][:-1] and "".join(held) == full.text == again.text  # held back, then released


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(tiny_model, byte_tokenizer):
    ids = byte_tokenizer(PROMPT).input_ids
    greedy = generate(tiny_model, byte_tokenizer, ids, Sampling(30)).token_ids
    samples = []
    for _ in range(2):
        torch.manual_seed(3)
        samples.append(generate(tiny_model, byte_tokenizer, ids, Sampling(30, temperature=1.0, top_p=0.9)).token_ids)
    assert samples[0] == samples[1] != greedy
    torch.manual_seed(4)
    assert generate(tiny_model, byte_tokenizer, ids, Sampling(30, temperature=1.0, top_p=1e-6)).token_ids == greedy


# --------------------------------------------------------------------------- prompts and chat

def test_one_prompt_uses_the_chat_template_when_there_is_one(byte_tokenizer):
    assert byte_tokenizer.decode(encode_prompt(byte_tokenizer, "Hi")) == "USER: Hi\nASSISTANT: "
    assert byte_tokenizer.decode(encode_prompt(byte_tokenizer, "Hi", system="Be brief.")) == \
        "Be brief.\nUSER: Hi\nASSISTANT: "
    assert encode_prompt(byte_tokenizer, "Hi", template=False) == byte_tokenizer("Hi").input_ids
    with pytest.raises(GenerationError, match="--system 'Be brief.' needs a chat template"):
        encode_prompt(byte_tokenizer, "Hi", template=False, system="Be brief.")


def test_chat_history_through_the_template(tiny_model, byte_tokenizer):
    chat = Chat(byte_tokenizer)
    first = chat.ask(tiny_model, "Where is the river?", Sampling(12))
    second = chat.ask(tiny_model, "And the fish?", Sampling(12))
    answer = first.text.strip()
    history = [{"role": "user", "content": "Where is the river?"}, {"role": "assistant", "content": answer},
               {"role": "user", "content": "And the fish?"}]
    expected_ids = byte_tokenizer.apply_chat_template(history, add_generation_prompt=True)["input_ids"]
    assert answer and answer in byte_tokenizer.decode(expected_ids)
    assert second.prompt_tokens == len(expected_ids)
    assert second.token_ids == argmax_loop(tiny_model, expected_ids, 12, byte_tokenizer.eos_token_id)
    assert chat.messages == history + [{"role": "assistant", "content": second.text.strip()}]


def test_chat_plain_transcript_without_a_template(tiny_model, byte_tokenizer):
    byte_tokenizer.chat_template = None
    chat = Chat(byte_tokenizer, system="A fishing talk.")
    first = chat.ask(tiny_model, "Where is the river?", Sampling(12))
    second = chat.ask(tiny_model, "And the fish?", Sampling(12))
    text = (f"A fishing talk.\n\nUser: Where is the river?\nAssistant: {first.text.strip()}\n"
            f"User: And the fish?\nAssistant:")
    ids = byte_tokenizer(text).input_ids
    assert second.prompt_tokens == len(ids)
    assert second.token_ids == generate(tiny_model, byte_tokenizer, ids, Sampling(12), stop=["\nUser:"]).token_ids


def test_chat_drops_the_oldest_turns_to_fit_and_refuses_a_turn_too_long(byte_tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(max_position_embeddings=96)).eval()
    chat = Chat(byte_tokenizer)
    for turn in range(4):
        result = chat.ask(model, f"Question {turn} about the angler", Sampling(16))  # 45 tokens + the answer
        assert result.prompt_tokens + 16 <= 96
    assert chat.dropped_turns >= 2 and chat.messages[-2]["content"] == "Question 3 about the angler"
    before = list(chat.messages)
    with pytest.raises(GenerationError,
                       match=r"the prompt is 118 tokens, over the model's window of 96 tokens \(default rope\)"):
        chat.ask(model, "y" * 100, Sampling(16))
    assert chat.messages == before
