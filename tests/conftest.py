"""Shared fixtures: tiny random LLaMA models, the offline byte tokenizer, shared data.

Markers: `slow` tests run only with --runslow; `gpu` tests run only where CUDA exists.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BOOKS = ROOT / "recipes" / "data" / "books"  # shipped with the project


def pytest_configure(config):
    """Every process of the suite finds the venv's tools first, as in an activated venv (the launcher tests'
    children always did). DeepSpeed builds its CPU ops (CPU Adam, shm) with the first ninja on PATH, and the
    venv's ninja and the system's record different command hashes in the build's log: a suite that used
    both rebuilt CPU Adam each time it switched (about 55 s a build on 2 cores, twice a `make test`)."""
    import os
    import sys

    venv_bin = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != venv_bin:
        os.environ["PATH"] = os.pathsep.join([venv_bin, path])


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="gpu: needs CUDA")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def free_port() -> str:
    """A TCP port free on this machine now: launchers of concurrent test runs must not collide."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def tiny_llama_config(**overrides):
    """A 2-layer LLaMA (hidden 64, 4 heads, 2 KV heads, 1k window) over the byte vocab."""
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_theta=10000.0, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def is_4bit(module) -> bool:
    return type(module).__name__ == "Linear4bit"


def dequantized_copy(nf4):
    """An fp32 model of nf4's class and config holding bitsandbytes' dequantization of each Linear4bit
    weight and nf4's other tensors as they are (biases of Qwen's q/k/v; a tied head is the embedding)."""
    import copy

    from bitsandbytes.functional import dequantize_4bit

    config = copy.deepcopy(nf4.config)
    del config.quantization_config
    plain = type(nf4)(config).eval()
    modules = dict(nf4.named_modules())
    state = {}
    for name, _ in plain.named_parameters():
        owner, _, attr = name.rpartition(".")
        module = modules[owner]
        quantized = is_4bit(module) and attr == "weight"
        state[name] = dequantize_4bit(module.weight.data, module.weight.quant_state) if quantized else \
            getattr(module, attr).data
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # only a tied head, which is not a parameter of its own
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return plain


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """The base-model cache (HARNESS_CACHE) every test of a session shares: each base is built once."""
    return tmp_path_factory.getbasetemp() / "harness-cache"


@contextmanager
def in_repo(cache: Path):
    """cwd = repo root and the shared base-model cache, for session-scoped fixtures too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HARNESS_CACHE", str(cache))
        patch.chdir(ROOT)
        yield patch


@pytest.fixture
def session_cache(cache):
    """The shared base-model cache, recipes read from the repo root."""
    with in_repo(cache):
        yield


def copy_with_other_weights(base: Path, copy: Path) -> Path:
    """A copy of a model directory whose first weight tensor is shifted by 1: the same shapes, other weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base, copy)
    weights = load_file(str(copy / "model.safetensors"))
    first = next(iter(weights))
    weights[first] = weights[first] + 1
    save_file(weights, str(copy / "model.safetensors"))
    return copy


def tiny_recipe(*overrides: str):
    """recipes/tiny_cpu.toml with `section.key=value` overrides."""
    from harness.recipe import load_recipe

    return load_recipe(ROOT / "recipes" / "tiny_cpu.toml", list(overrides))


@pytest.fixture
def tiny_config():
    return tiny_llama_config()


@pytest.fixture
def tiny_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def byte_tokenizer():
    from harness.tokenizer import byte_tokenizer as build

    return build()


@pytest.fixture
def book_path():
    """Path of a public-domain book shipped in recipes/data/books."""
    return BOOKS / "news_from_nowhere.txt"
