"""Card and model shapes: what the planner knows of the hardware and of a model without its weights.

    card_named("v100-32gb").total_bytes          # a known card, or custom_card(24) for --gib 24
    model_shape(recipe)                          # ModelShape from --config, init_config, a cached
                                                 # config.json or KNOWN_SHAPES
    LLAMA2_SHAPES["llama2-7b"]                   # the published LLaMA-2 configs' shape keys

Units: a card's memory is in MiB (2**20 bytes, as nvidia-smi reports it), sizes in bytes.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from harness import policy
from harness.errors import HarnessError
from harness.recipe import Recipe

MIB = 2**20
# Every projection of a decoder layer in any family (a shape's linears() holds those it has).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")


class PlanError(HarnessError, ValueError):
    """A plan that cannot be made; the message says what to pass instead."""


# --------------------------------------------------------------------------- cards

@dataclass(frozen=True)
class Card:
    name: str
    total_mib: int  # what nvidia-smi reports as total memory
    capability: tuple[int, int]  # CUDA compute capability: flash kernels need >= (8, 0)
    bf16: bool

    @property
    def total_bytes(self) -> int:
        return self.total_mib * MIB

    @property
    def device(self) -> policy.Device:
        """What harness.policy decides by: the planner makes the choices a run on this card makes."""
        return policy.Device("cuda", self.capability, self.bf16)


CARDS = {card.name: card for card in (  # named by the vendors' labels, whose "GB" are GiB
    Card("v100-32gb", 32768, (7, 0), bf16=False),
    Card("a100-40gb", 40960, (8, 0), bf16=True),
    Card("a100-80gb", 81920, (8, 0), bf16=True),
    Card("h100-80gb", 81559, (9, 0), bf16=True),
    Card("rtx4090-24gb", 24564, (8, 9), bf16=True),
)}


def card_named(name: str) -> Card:
    if name not in CARDS:
        raise PlanError(f"unknown card {name!r}; known cards: {', '.join(CARDS)} (or pass --gib N)")
    return CARDS[name]


def custom_card(gib: float) -> Card:
    """A card of `gib` GiB, assumed Ampere-class (flash kernels, bf16)."""
    if not (gib > 0 and math.isfinite(gib)):
        raise PlanError(f"--gib {gib:g}: the card memory must be a positive number of GiB")
    return Card(f"{gib:g} GiB", int(gib * 1024), (8, 0), bf16=True)


# --------------------------------------------------------------------------- model shape

# Families whose decoder layers fuse projections into one linear layer (transformers' module names).
FUSED_PROJECTIONS = {"phi3": ("qkv_proj", "gate_up_proj")}


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool  # lm_head shares the embedding matrix
    source: str = ""  # where the shape was read
    fused: tuple[str, ...] = ()  # fused projections: "qkv_proj" for q/k/v, "gate_up_proj" for gate/up (Phi-3)
    softcapped: bool = False  # attention logits soft-capped (Gemma-2): SDPA cannot run it (harness.policy)

    @classmethod
    def from_config(cls, config: dict, source: str) -> ModelShape:
        """From a config.json or init_config of any family transformers knows: its model_type's config
        class ("llama" when absent: LLaMA-7B's defaults) fills the keys the dict leaves out, and a
        multimodal config gives its text model's. Other families are read by LLaMA's key names."""
        config = _family_values(config, source)
        hidden = int(config.get("hidden_size", 4096))
        heads = int(config.get("num_attention_heads", 32))
        return cls(
            vocab=int(config.get("vocab_size", 32000)), hidden=hidden,
            intermediate=int(config.get("intermediate_size", 11008)),
            layers=int(config.get("num_hidden_layers", 32)), heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            tied=bool(config.get("tie_word_embeddings", False)), source=source,
            fused=FUSED_PROJECTIONS.get(config.get("model_type"), ()),
            softcapped=config.get("attn_logit_softcapping") is not None,
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer, by module name."""
        d, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        qkv = {"qkv_proj": (d, q + 2 * kv)} if "qkv_proj" in self.fused else {"q_proj": (d, q), "k_proj": (d, kv),
                                                                                "v_proj": (d, kv)}
        gate_up = {"gate_up_proj": (d, 2 * i)} if "gate_up_proj" in self.fused else {"gate_proj": (d, i),
                                                                                     "up_proj": (d, i)}
        return {**qkv, "o_proj": (q, d), **gate_up, "down_proj": (i, d)}


def _family_values(config: dict, source: str) -> dict:
    """The config's keys with its family's defaults (harness.base_model.config_from_dict)."""
    from transformers import CONFIG_MAPPING

    from harness.base_model import DEFAULT_MODEL_TYPE, config_from_dict

    if config.get("model_type", DEFAULT_MODEL_TYPE) not in CONFIG_MAPPING:
        return config  # a remote-code family: its own keys as they are
    try:
        return config_from_dict(config).get_text_config().to_dict()
    except (ValueError, TypeError) as error:
        raise PlanError(f"cannot read the model config {source}: {error}") from None


def _shape(vocab, hidden, intermediate, layers, heads, kv_heads, tied, **family):
    """A published config's shape keys; `family` adds model_type, head_dim and the like."""
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "tie_word_embeddings": tied, **family}


# The published LLaMA-2 configs (multi-head attention), by the names the benchmarks use.
LLAMA2_SHAPES = {
    "llama2-7b": _shape(32000, 4096, 11008, 32, 32, 32, False),
    "llama2-13b": _shape(32000, 5120, 13824, 40, 40, 40, False),
}

# From the published config.json files (hub ids, as recipes name them).
KNOWN_SHAPES = {
    "meta-llama/Llama-2-7b-hf": LLAMA2_SHAPES["llama2-7b"],
    "meta-llama/Llama-2-13b-hf": LLAMA2_SHAPES["llama2-13b"],
    "lmsys/vicuna-13b-v1.5": LLAMA2_SHAPES["llama2-13b"],
    "HuggingFaceTB/SmolLM2-135M": _shape(49152, 576, 1536, 30, 9, 3, True),
    "HuggingFaceTB/SmolLM2-135M-Instruct": _shape(49152, 576, 1536, 30, 9, 3, True),
    "meta-llama/Meta-Llama-3-8B": _shape(128256, 4096, 14336, 32, 32, 8, False),
    "meta-llama/Llama-3.1-8B": _shape(128256, 4096, 14336, 32, 32, 8, False),
    "mistralai/Mistral-7B-v0.1": _shape(32000, 4096, 14336, 32, 32, 8, False, model_type="mistral"),
    "mistralai/Mistral-7B-v0.3": _shape(32768, 4096, 14336, 32, 32, 8, False, model_type="mistral"),
    "Qwen/Qwen2.5-7B": _shape(152064, 3584, 18944, 28, 28, 4, False, model_type="qwen2"),
    "Qwen/Qwen3-8B": _shape(151936, 4096, 12288, 36, 32, 8, False, model_type="qwen3", head_dim=128),
    "microsoft/Phi-3-mini-4k-instruct": _shape(32064, 3072, 8192, 32, 32, 32, False, model_type="phi3"),
}


def model_shape(recipe: Recipe, config_path: str | os.PathLike | None = None) -> ModelShape:
    """The model's shape without its weights: --config, init_config, a local or cached
    config.json, else the built-in table (by hub id, or by the file name of a GGUF)."""
    name = recipe.model.name_or_path
    if config_path:
        return ModelShape.from_config(read_json(Path(config_path)), str(config_path))
    if name == "random":
        return ModelShape.from_config(recipe.model.init_config, "model.init_config")
    for candidate in _config_files(name):
        if candidate.is_file():
            return ModelShape.from_config(read_json(candidate), str(candidate))
    # "pypi:.../SmolLM2-135M-Instruct.Q4_1.gguf" -> "smollm2-135m-instruct"
    basename = name.rstrip("/").split("/")[-1].split(".")[0].lower()
    key = next((k for k in KNOWN_SHAPES if k.lower() == name.lower() or k.lower().split("/")[-1] == basename), None)
    if key:
        return ModelShape.from_config(KNOWN_SHAPES[key], f"built-in shape of {key}")
    raise PlanError(
        f"model.name_or_path = {name!r}: no config.json found locally or in the HF cache, and it is not one "
        f"of the built-in shapes ({', '.join(KNOWN_SHAPES)}). Hub look-ups are not made: pass "
        f"--config path/to/config.json"
    )


def _config_files(name: str) -> list[Path]:
    """config.json of a local directory, of a GGUF already converted into the harness cache,
    or of a hub id in the HF cache."""
    from harness.base_model import cache_root

    files = [Path(name).expanduser() / "config.json"]
    if name.endswith(".gguf"):  # harness.base_model converts it to <cache>/gguf/<stem>-<key>/
        files += sorted((cache_root() / "gguf").glob(f"{Path(name).stem}-*/config.json"))
    elif "/" in name and not name.startswith((".", "/", "~", "pypi:")):
        home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
        hub = os.environ.get("HF_HUB_CACHE") or home / "hub"
        snapshots = Path(hub) / f"models--{name.replace('/', '--')}" / "snapshots"
        files += sorted(snapshots.glob("*/config.json"))
    return files


def read_json(path: Path) -> dict:
    """A model's config.json, or a PlanError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise PlanError(f"cannot read the model config {path}: {error}") from None
