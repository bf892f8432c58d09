"""Model assembly: base -> position -> quantization -> attention -> adapter.

    built = build_model(recipe)          # training: k-bit prep, checkpointing, LoRA
    built = build_model(recipe, training=False)

Each step is a registered backend that gets the plain keyword arguments of its recipe
table (harness.registry.table_kwargs), so a backend never sees the whole recipe.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from harness import policy, registry, rundir
from harness.backends.position import original_context_of
from harness.backends.quantization import TORCH_DTYPES
from harness.base_model import materialize
from harness.fingerprint import warn_if_other_base
from harness.recipe import Recipe, RecipeError
from harness.recipe_checks import check_position
from harness.tokenizer import load_tokenizer


@dataclass
class BuiltModel:
    model: torch.nn.Module
    tokenizer: object
    original_context: int
    rope_factor: float
    attention_implementation: str
    weights_dtype: str  # what the frozen unquantized weights loaded in (harness.policy.frozen_weights_dtype)


@dataclass
class Base:
    """The base model before its weights load: where it is, its config, tokenizer and window."""
    path: str
    config: object
    tokenizer: object
    original_context: int


def load_base(recipe: Recipe) -> Base:
    """Config and tokenizer of the recipe's base (materialized once for random and GGUF bases)."""
    cfg = recipe.model
    path = materialize(cfg.name_or_path, init_config=cfg.init_config, init_seed=cfg.init_seed, gguf_file=cfg.gguf_file)
    config = _load_config(path, cfg.trust_remote_code)
    original = original_context_of(config, cfg.original_context)
    check_position(recipe, original)
    return Base(path, config, load_tokenizer(cfg.tokenizer or path), original)


def build_model(recipe: Recipe, *, training: bool = True, with_adapter: bool = True, base: Base | None = None,
                console: Console | None = None) -> BuiltModel:
    """Load and assemble the model a recipe describes (on `base`, when already loaded)."""
    cfg = recipe.model
    base = base or load_base(recipe)
    config = base.config
    factor = _backend_call(recipe, "position", config, original_context=base.original_context)
    quantization = _backend_call(recipe, "quantization")
    weights_dtype = weights_dtype_of(recipe)
    model = _load_weights(base.path, config, quantization, dtype=TORCH_DTYPES[weights_dtype],
                          trust=cfg.trust_remote_code)
    implementation = _backend_call(recipe, "attention", model)
    if training:
        _prepare_for_training(model, upcast=quantization is not None and recipe.train.fp32_frozen_weights,
                              checkpointing=recipe.train.gradient_checkpointing)
    if with_adapter:
        model = _backend_call(recipe, "adapter", model)
    if training and recipe.train.tiled_mlp:
        from harness.tiled import tile_mlps

        tile_mlps(model)  # MLPs in sequence tiles, recomputed in backward
    if console is not None:
        print_summary(model, console)
    return BuiltModel(model, base.tokenizer, base.original_context, factor, implementation, weights_dtype)


def weights_dtype_of(recipe: Recipe) -> str:
    """The dtype the frozen unquantized weights load in on this machine (harness.policy decides)."""
    return policy.frozen_weights_dtype(recipe.model.dtype, recipe.quantization.compute_dtype, policy.Device.current())


def _backend_call(recipe: Recipe, kind: str, *args, **extra):
    table = getattr(recipe, kind)
    try:
        backend = registry.get(kind, table.name, key=f"{kind}.name")
        kwargs = registry.table_kwargs(backend, table)
        return backend.fn(*args, **kwargs, **extra)
    except (registry.BackendError, ValueError) as error:
        where = f"{recipe.source}: " if recipe.source else ""
        raise RecipeError(f"{where}{error}") from None


def _load_config(base: str, trust_remote_code: bool):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)


def _load_weights(base: str, config, quantization, *, dtype: torch.dtype, trust: bool):
    from transformers import AutoModelForCausalLM

    device_map = {"": torch.cuda.current_device()} if quantization is not None and torch.cuda.is_available() else None
    return AutoModelForCausalLM.from_pretrained(
        base, config=config, quantization_config=quantization, dtype=dtype, device_map=device_map,
        trust_remote_code=trust,
    )


def _prepare_for_training(model, *, upcast: bool, checkpointing: bool) -> None:
    """Non-reentrant checkpointing; with `upcast`, the k-bit preparation (frozen base, fp32
    embeddings, norms and head). Without it the frozen weights keep model.dtype: the residual
    stream, and so every checkpointed hidden state, stays 16-bit on GPUs (half the activation
    memory), while RMSNorm still computes in fp32 and the adapter and the loss stay fp32."""
    if upcast:
        _upcast_frozen(model)
    if checkpointing:  # transformers also makes the embeddings' output require grad (input_ids models)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def _upcast_frozen(model) -> None:
    """What peft's prepare_model_for_kbit_training does for a bitsandbytes model, without its call of
    transformers' deprecated gradient_checkpointing_enable: every weight frozen, every 16-bit one
    not stored in 4 bits made fp32."""
    for parameter in model.parameters():
        parameter.requires_grad = False
        if parameter.dtype in (torch.float16, torch.bfloat16) and type(parameter).__name__ != "Params4bit":
            parameter.data = parameter.data.float()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the 16-bit copies the casts freed


# --------------------------------------------------------------------------- summary

def parameter_counts(model) -> dict[str, dict[str, int]]:
    """{dtype: {"total": elements, "trainable": elements, "bytes": bytes}} over parameters.

    bitsandbytes packs two 4-bit weights into one uint8 element, so a 4-bit layer counts
    its *stored* elements; `bytes` is what the weights take in memory.
    """
    counts: dict[str, dict[str, int]] = {}
    for parameter in model.parameters():
        row = counts.setdefault(str(parameter.dtype).replace("torch.", ""), {"total": 0, "trainable": 0, "bytes": 0})
        row["total"] += parameter.numel()
        row["bytes"] += parameter.numel() * parameter.element_size()
        if parameter.requires_grad:
            row["trainable"] += parameter.numel()
    return counts


def estimated_training_bytes(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """Weights as stored, plus fp32 gradients and two fp32 AdamW moments per trainable element."""
    trainable = sum(row["trainable"] for row in counts.values())
    return {
        "weights": sum(row["bytes"] for row in counts.values()),
        "gradients": 4 * trainable,
        "optimizer": 8 * trainable,
    }


def print_summary(model, console: Console) -> None:
    counts = parameter_counts(model)
    table = Table(title="Parameters", show_footer=True)
    table.add_column("dtype", footer="all")
    table.add_column("elements", justify="right", footer=f"{sum(r['total'] for r in counts.values()):,}")
    table.add_column("trainable", justify="right", footer=f"{sum(r['trainable'] for r in counts.values()):,}")
    table.add_column("memory", justify="right", footer=_gib(sum(r["bytes"] for r in counts.values())))
    for dtype, row in sorted(counts.items()):
        table.add_row(dtype, f"{row['total']:,}", f"{row['trainable']:,}", _gib(row["bytes"]))
    console.print(table)
    estimate = estimated_training_bytes(counts)
    parts = ", ".join(f"{name} {_gib(size)}" for name, size in estimate.items())
    console.print(f"Estimated memory before activations: {_gib(sum(estimate.values()))} ({parts})")


def _gib(size: int) -> str:
    return f"{size / 2**30:.3f} GiB" if size >= 2**27 else f"{size / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- inference

def load_for_eval(model_path: str, *, adapter: str | None = None, load_in_4bit: bool = False,
                  attention: str = "full", tokenizer: str | None = None, rope_factor: float = 0.0,
                  position: str = "linear"):
    """(model, tokenizer, label) for evaluation tools.

    With an adapter or checkpoint directory, its saved recipe supplies the base model (unless
    `model_path` names one), the rope settings and the tokenizer: nothing is typed twice.
    Without one, `model_path` is used as it is (a merged model carries its rope in config.json),
    or with its rope stretched by `rope_factor` (zero-shot, no training) by the position backend
    `position` (linear PI unless named: dynamic, yarn, llama3).
    """
    from harness.recipe import AdapterConfig, AttentionConfig, QuantizationConfig

    recipe = _eval_recipe(model_path, adapter)
    recipe = replace(
        recipe,
        quantization=QuantizationConfig(name="nf4" if load_in_4bit else "none",
                                        compute_dtype=recipe.quantization.compute_dtype),
        attention=AttentionConfig(name="s2" if attention == "s2" else "full", at_inference=attention == "s2",
                                  group_ratio=recipe.attention.group_ratio, group_size=recipe.attention.group_size),
        adapter=AdapterConfig(name="none"),
        position=recipe.position if adapter else _zero_shot_position(rope_factor, position),
    )
    if tokenizer:
        recipe = replace(recipe, model=replace(recipe.model, tokenizer=tokenizer))
    base = load_base(recipe)
    built = build_model(recipe, training=False, with_adapter=False, base=base)
    model = built.model
    if adapter:
        model = rundir.attach_adapter(model, adapter)  # other shapes: an error, and no warning before it
        warn_if_other_base(recipe.resolved.base_fingerprint, base.path, adapter)
    label = Path(model_path or recipe.model.name_or_path).name + (f"+{Path(adapter).name}" if adapter else "")
    label += f"+{'PI' if position == 'linear' else position} x{rope_factor:g}" if rope_factor and not adapter else ""
    return model.eval(), built.tokenizer, label


def _zero_shot_position(rope_factor: float, position: str):
    """The stretch as a recipe's [position] table: target_length 0, so the backend widens the window by
    the factor (dynamic NTK keeps the original there, as transformers reads it)."""
    from harness.recipe import PositionConfig

    return PositionConfig(name=position, factor=rope_factor) if rope_factor else PositionConfig(name="none")


def _eval_recipe(model_path: str, adapter: str | None) -> Recipe:
    from harness.recipe import ModelConfig

    if adapter:
        recipe = rundir.read_recipe(adapter)
        if model_path:
            recipe = replace(recipe, model=replace(recipe.model, name_or_path=model_path))
        return recipe
    return Recipe(model=ModelConfig(name_or_path=model_path))
