"""Recipes: one TOML file per experiment, parsed into typed, frozen dataclasses.

    recipe = load_recipe("recipes/llama2_13b_12k.toml", overrides=["train.max_steps=10"])

Every table maps to one dataclass below. Unknown keys are rejected with their full dotted
path and a did-you-mean; values are checked against the field types; backend names are
checked against the registry. `resolve` then computes the derived values (the PI factor,
the S2 group size, the effective batch size) into `recipe.resolved`, and `save_recipe`
writes the whole resolved recipe back as TOML beside every checkpoint.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DTYPES = ("auto", "bf16", "fp16", "fp32")
MAX_SANE_LR = 0.1  # above it, train.lr is warned about
LEGACY_ROPE_KEYS = {"rope_theta", "rope_scaling"}  # accepted by transformers' configs, stored in rope_parameters


# What the testbed grid measured of the paper's pairing (README, "Does S2 training transfer to full attention?").
PI_S2_DOES_NOT_TRANSFER = (
    "position.name = \"linear\" with attention.name = \"s2\" (the paper's pairing): on the testbed grid, adapters "
    "trained this way broke under full attention past their S2 group, the way users serve them; position.name = "
    "\"yarn\" with S2 held. README, \"Does S2 training transfer to full attention?\""
)


class RecipeError(HarnessError, ValueError):
    """A recipe that cannot be used; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = ""  # hub id, local HF directory, .gguf file, or "random" (init_config)
    gguf_file: str = ""  # a GGUF file inside name_or_path (hub repo or directory)
    tokenizer: str = ""  # "" = the model's own; "builtin:bytes" = offline byte tokenizer
    init_config: dict[str, Any] = field(default_factory=dict)  # "random": model_type (default llama) + its config kwargs
    init_seed: int = 0  # seed of the random initialisation
    dtype: str = "auto"  # weights of the non-quantized parts: auto | bf16 | fp16 | fp32
    original_context: int = 0  # 0 = the model config's max_position_embeddings
    trust_remote_code: bool = False


@dataclass(frozen=True)
class PositionConfig:
    name: str = "linear"  # linear (PI) | dynamic (NTK) | yarn | llama3 | none
    target_length: int = 0  # the extended context window, in tokens
    factor: float = 0.0  # 0 = ceil(target_length / original_context), as in the paper
    override_native: bool = False  # replace a model's own non-default rope type
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3


@dataclass(frozen=True)
class QuantizationConfig:
    name: str = "nf4"  # nf4 | int8 | none
    double_quant: bool = True
    compute_dtype: str = "bf16"  # bf16 | fp16 | fp32 | auto (bf16 / fp16 on older GPUs / fp32 on CPU)
    storage_dtype: str = "uint8"  # uint8, or the compute dtype for ZeRO-3 sharding


@dataclass(frozen=True)
class AttentionConfig:
    name: str = "s2"  # s2 (shift short attention in training) | full
    kernel: str = "auto"  # auto | sdpa | flash | eager
    group_ratio: float = 0.25  # S2 group size as a share of the sequence
    group_size: int = 0  # > 0: a fixed group size that overrides group_ratio
    at_inference: bool = False  # keep S2 in model.eval() (the paper's ablation)


@dataclass(frozen=True)
class AdapterConfig:
    name: str = "lora"  # lora | none (full fine-tuning of an unquantized model)
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    bias: str = "none"  # none | all | lora_only
    trainable_embeddings: bool = False  # LongLoRA's "embed" option
    trainable_norms: bool = False  # LongLoRA's "norm" option


@dataclass(frozen=True)
class DataConfig:
    name: str = "pretrain"  # pretrain | sft | tokens
    path: str = ""  # file, folder, glob, or "hub:owner/name"
    split: str = "train"
    text_field: str = "text"
    format: str = "auto"  # sft: vicuna | sharegpt | messages | auto
    system_prompt: str = ""
    max_seq_length: int = 0  # 0 = position.target_length
    min_tokens: int = 0
    mode: str = "truncate"  # truncate | pack
    add_bos: bool = True
    add_eos: bool = True
    eval_fraction: float = 0.0
    eval_path: str = ""
    streaming: bool = False
    strict: bool = False
    cache_dir: str = ""
    num_proc: int = 1


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 42
    micro_batch_size: int = 1
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps; 0 = run `epochs` epochs
    epochs: int = 0
    lr: float = 2e-4
    scheduler: str = "constant_with_warmup"  # constant_with_warmup | cosine | linear
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    optimizer: str = "auto"  # auto | adamw | paged_adamw_32bit | deepspeed_cpu_adam
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    gradient_checkpointing: bool = True
    chunked_loss: bool = True  # head + cross-entropy in chunks: no full fp32 logits
    release_cpu_memory: bool = True  # CPU: freed tensors go back to the OS (harness.cpu_memory)
    cpu_cache_mb: int = 256  # CPU: freed tensors kept for reuse, up to this many MiB (0 = none); needs release_cpu_memory
    offload_activations: bool = False  # GPU: keep checkpointed activations in pinned CPU memory
    fp32_frozen_weights: bool = False  # QLoRA: peft's fp32 cast of embeddings, norms, head (fp32 residual stream)
    tiled_mlp: bool = False  # MLP in sequence tiles, recomputed in backward (harness.tiled): long sequences
    log_every: int = 1
    eval_every: int = 0  # held-out perplexity every N steps (and at the end, whenever there is held-out data)
    eval_batches: int = 0  # held-out samples scored at each evaluation; 0 = the whole held-out split
    eval_s2: bool = False  # also score the target length under S2 (where S2 trains)
    eval_rises: int = 2  # warn when full-attention perplexity at the target rose this many evaluations in a row
    eval_stop: bool = False  # ... and stop the run there (checkpoint saved, no final/)
    save_every: int = 0  # 0 = only the final export
    keep_checkpoints: int = 2
    resume: str = "never"  # never | auto
    allow_data_change: bool = False  # resume even when data.path / data.eval_path changed since the checkpoint
    overwrite: bool = False
    report_to: list[str] = field(default_factory=list)  # trackers: tensorboard | wandb | mlflow (harness.metrics)
    tensorboard: bool = False  # the same as report_to = ["tensorboard"]


@dataclass(frozen=True)
class EngineConfig:
    name: str = "accelerate"  # accelerate | deepspeed
    deepspeed_config: str = ""  # JSON file, relative to the working directory or the recipe
    sequence_parallel_size: int = 1  # Ulysses sequence parallelism over N ranks (deepspeed); 1 = off


@dataclass(frozen=True)
class Resolved:
    """Derived values, computed by `resolve` and saved with every checkpoint."""

    original_context: int = 0  # 0 = read from the model config at load time
    rope_factor: float = 0.0
    seq_len: int = 0
    group_size: int = 0  # S2 group size at seq_len (0 for full attention)
    weights_dtype: str = ""  # what the frozen unquantized weights trained in (harness.policy); "" = not recorded
    world_size: int = 1
    effective_batch_size: int = 0  # sequences per optimizer step
    tokens_per_step: int = 0
    best_eval_step: int = 0  # the step of the lowest held-out perplexity at seq_len, full attention (0: none yet)
    best_eval_ppl: float = 0.0  # that perplexity
    base_fingerprint: str = ""  # the base's weight files (harness.fingerprint); "" = not known (a hub id)


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    resolved: Resolved = field(default_factory=Resolved)
    source: str = field(default="", compare=False)  # the file it came from, for messages

    def to_dict(self) -> dict[str, Any]:
        tables = dataclasses.asdict(self)
        tables.pop("source")
        return tables


# --------------------------------------------------------------------------- parsing

def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read, override, type-check, validate and resolve a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}. Pass the path of a .toml recipe, e.g. recipes/tiny_cpu.toml")
    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path}: not valid TOML: {error}") from None
    for override in overrides:
        apply_override(tables, override)
    recipe = resolve(_expand_home(recipe_from_dict(tables, source=str(path))))
    validate(recipe)
    return recipe


def _expand_home(recipe: Recipe) -> Recipe:
    """"~" in the recipe's local paths means the home directory, as in a shell (not a folder named "~")."""
    def expanded(value: str) -> str:
        return os.path.expanduser(value) if value.startswith("~") else value

    return dataclasses.replace(
        recipe, train=dataclasses.replace(recipe.train, output_dir=expanded(recipe.train.output_dir)),
        data=dataclasses.replace(recipe.data, path=expanded(recipe.data.path), eval_path=expanded(recipe.data.eval_path)),
        model=dataclasses.replace(recipe.model, name_or_path=expanded(recipe.model.name_or_path)))


def read_saved_recipe(path: str | os.PathLike) -> Recipe:
    """A recipe saved beside a checkpoint, as it was resolved; files it names need not exist here."""
    try:
        tables = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise RecipeError(f"{path}: cannot read the saved recipe: {error}") from None
    return recipe_from_dict(tables, source=str(path))


def apply_override(tables: dict, override: str) -> None:
    """Set `section.key=value` in the raw tables; the value is read as TOML, else a string."""
    dotted, sep, text = override.partition("=")
    if not sep or "." not in dotted:
        raise RecipeError(f"override {override!r} is not of the form section.key=value, e.g. train.max_steps=10")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    *parents, leaf = dotted.strip().split(".")
    table = tables
    for part in parents:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise RecipeError(f"override {override!r}: {part!r} is a value, not a table")
    table[leaf] = value


def recipe_from_dict(tables: dict[str, Any], *, source: str = "") -> Recipe:
    where = f"{source}: " if source else ""
    return _build(Recipe, {k: v for k, v in tables.items()}, prefix="", where=where, source=source)


def _build(cls, values: dict[str, Any], *, prefix: str, where: str, source: str = ""):
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {prefix}{close[0]!r}?" if close else f" Known keys: {', '.join(known)}."
            raise RecipeError(f"{where}unknown key {path!r}.{hint}")
        kwargs[key] = _convert(hints[key], value, path=path, where=where)
    if cls is Recipe:
        kwargs["source"] = source
    return cls(**kwargs)


def _convert(hint, value, *, path: str, where: str):
    """Check `value` against the annotation `hint`; returns the typed value."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}{path} must be a table ([{path}]), got {value!r}")
        return _build(hint, value, prefix=f"{path}.", where=where)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value]  # a single module name is a one-item list
        if not isinstance(value, list):
            raise RecipeError(f"{where}{path} = {value!r}: expected a list of {item.__name__}")
        return [_convert(item, v, path=f"{path}[{i}]", where=where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}{path} = {value!r}: expected a table")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any or (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise RecipeError(f"{where}{path} = {value!r} has type {type(value).__name__}, expected {hint.__name__}"
                      f"{_type_hint(hint, value)}")


def _type_hint(hint, value) -> str:
    """How to write the value: unquoted when the string is one, else an example of the type."""
    examples = {int: "an integer, e.g. 10", float: "a number, e.g. 2e-4", bool: "true or false"}
    if not isinstance(value, str) or hint not in examples:
        return ""
    try:
        quoted = value.lower() in ("true", "false") if hint is bool else hint(value) is not None
    except ValueError:
        quoted = False
    return f" (write {value} without quotes)" if quoted else f" (write {examples[hint]})"


# --------------------------------------------------------------------------- validation

def validate(recipe: Recipe) -> None:
    """Cross-field checks of a resolved recipe: backend names, choices, lengths, files."""
    from harness import registry

    where = f"{recipe.source}: " if recipe.source else ""
    _check_choices(recipe, where)
    _check_lengths(recipe, where)
    _check_combinations(recipe, where)
    _check_adapter(recipe, where)
    _check_files(recipe, where)
    _check_output_outside_data(recipe, where)
    attention = recipe.attention
    if recipe.position.name == "linear" and attention.name == "s2" and not attention.at_inference:
        logging.getLogger("harness").warning("%s%s", where, PI_S2_DOES_NOT_TRANSFER)
    for kind in registry.KINDS:
        table = getattr(recipe, kind)
        try:
            backend = registry.get(kind, table.name, key=f"{kind}.name")
        except registry.BackendError as error:
            raise RecipeError(f"{where}{error}") from None
        for message in registry.ignored_settings(backend, table, section=kind):
            logging.getLogger("harness").warning("%s%s", where, message)


def _choice(where: str, key: str, value, choices) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{where}{key} = {value!r} is not one of {', '.join(map(repr, choices))}.{hint}")


def _check_choices(recipe: Recipe, where: str) -> None:
    _choice(where, "model.dtype", recipe.model.dtype, DTYPES)
    _choice(where, "quantization.compute_dtype", recipe.quantization.compute_dtype, DTYPES)
    _choice(where, "quantization.storage_dtype", recipe.quantization.storage_dtype, ("uint8",) + DTYPES)
    _choice(where, "attention.kernel", recipe.attention.kernel, ("auto", "sdpa", "flash", "eager"))
    _choice(where, "adapter.bias", recipe.adapter.bias, ("none", "all", "lora_only"))
    _choice(where, "data.mode", recipe.data.mode, ("truncate", "pack"))
    _choice(where, "data.format", recipe.data.format, ("auto", "vicuna", "sharegpt", "messages"))
    _choice(where, "train.scheduler", recipe.train.scheduler, ("constant_with_warmup", "cosine", "linear"))
    _choice(where, "train.optimizer", recipe.train.optimizer, ("auto", "adamw", "paged_adamw_32bit", "deepspeed_cpu_adam"))
    _choice(where, "train.precision", recipe.train.precision, DTYPES)
    _choice(where, "train.resume", recipe.train.resume, ("never", "auto"))
    for index, tracker in enumerate(recipe.train.report_to):
        _choice(where, f"train.report_to[{index}]", tracker, ("tensorboard", "wandb", "mlflow"))


def _positive(where: str, key: str, value, *, allow_zero: bool = False) -> None:
    """value > 0 (>= 0 with allow_zero), and finite: NaN compares false with everything and passes a
    plain bound check, then trains a NaN model."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise RecipeError(f"{where}{key} = {value!r} must be a finite number {bound}")


def _check_lengths(recipe: Recipe, where: str) -> None:
    position, train = recipe.position, recipe.train
    if position.name != "none":
        _positive(where, "position.target_length", position.target_length)
        original = recipe.resolved.original_context
        if original and position.target_length < original:
            raise RecipeError(
                f"{where}position.target_length = {position.target_length} is shorter than the model's "
                f"original context of {original} tokens: context extension needs a longer "
                f"target (e.g. {2 * original}), or position.name = \"none\""
            )
    _positive(where, "position.factor", position.factor, allow_zero=True)
    _positive(where, "data.max_seq_length", recipe.data.max_seq_length, allow_zero=True)
    _positive(where, "train.micro_batch_size", train.micro_batch_size)
    _positive(where, "train.grad_accum", train.grad_accum)
    _positive(where, "train.lr", train.lr)
    if train.lr > MAX_SANE_LR:
        logging.getLogger("harness").warning(
            "%strain.lr = %g is far above fine-tuning rates (1e-5 to 1e-3): the model is likely to collapse "
            "(a zero gradient, the loss at ln(vocabulary))", where, train.lr)
    _positive(where, "train.max_grad_norm", train.max_grad_norm, allow_zero=True)
    _positive(where, "train.warmup_steps", train.warmup_steps, allow_zero=True)
    _positive(where, "train.save_every", train.save_every, allow_zero=True)
    _positive(where, "train.keep_checkpoints", train.keep_checkpoints, allow_zero=True)
    _positive(where, "train.log_every", train.log_every)
    _positive(where, "train.eval_every", train.eval_every, allow_zero=True)
    _positive(where, "train.eval_batches", train.eval_batches, allow_zero=True)
    _positive(where, "train.eval_rises", train.eval_rises, allow_zero=True)
    if train.eval_stop and not train.eval_rises:
        raise RecipeError(f"{where}train.eval_stop = true needs train.eval_rises > 0 (how many rises in a row stop "
                          f"the run), e.g. train.eval_rises = 2")
    _positive(where, "train.cpu_cache_mb", train.cpu_cache_mb, allow_zero=True)
    _positive(where, "engine.sequence_parallel_size", recipe.engine.sequence_parallel_size)
    if train.max_steps <= 0 and train.epochs <= 0:
        raise RecipeError(f"{where}train.max_steps = {train.max_steps} and train.epochs = {train.epochs}: set one of them > 0")
    attention = recipe.attention
    if not 0 < attention.group_ratio <= 1:
        raise RecipeError(f"{where}attention.group_ratio = {attention.group_ratio} must be in (0, 1]; the paper uses 0.25")
    if attention.group_size and attention.group_size % 2:
        raise RecipeError(f"{where}attention.group_size = {attention.group_size} must be even (shifted heads move by half a group)")
    seq_len = recipe.resolved.seq_len
    if attention.name == "s2" and seq_len and attention.group_size > seq_len:
        raise RecipeError(f"{where}attention.group_size = {attention.group_size} is longer than the training sequence "
                          f"of {seq_len} tokens: choose a group of at most {seq_len // 2 * 2} tokens, or 0 to use "
                          f"attention.group_ratio")
    if not 0 <= recipe.data.eval_fraction < 1:
        raise RecipeError(f"{where}data.eval_fraction = {recipe.data.eval_fraction} must be in [0, 1)")


def _check_adapter(recipe: Recipe, where: str) -> None:
    """LoRA's rank and dropout, before any data or weights load (peft's own errors come later and name no key)."""
    adapter = recipe.adapter
    if adapter.name == "none":
        return
    _positive(where, "adapter.r", adapter.r)
    _positive(where, "adapter.alpha", adapter.alpha)
    if not 0 <= adapter.dropout < 1:
        raise RecipeError(f"{where}adapter.dropout = {adapter.dropout!r} must be in [0, 1): the share of inputs "
                          f"LoRA drops in training (the paper: 0.05)")
    hidden = _local_config(recipe.model).get("hidden_size")
    if isinstance(hidden, int) and adapter.r > hidden:
        raise RecipeError(f"{where}adapter.r = {adapter.r} is larger than the model's hidden size {hidden}: a rank "
                          f"above it adds parameters and no capacity. Use at most {hidden} (the paper: 64)")


def _check_combinations(recipe: Recipe, where: str) -> None:
    if recipe.quantization.name != "none" and recipe.adapter.name == "none":
        raise RecipeError(
            f"{where}quantization.name = {recipe.quantization.name!r} with adapter.name = \"none\": a quantized "
            f"base is frozen, so there is nothing to train. Use adapter.name = \"lora\" (QLoRA), or "
            f"quantization.name = \"none\" for full fine-tuning"
        )
    if recipe.engine.name == "deepspeed" and not recipe.engine.deepspeed_config:
        raise RecipeError(
            f"{where}engine.name = \"deepspeed\" needs engine.deepspeed_config, the DeepSpeed JSON file, "
            f"e.g. engine.deepspeed_config = \"launch/deepspeed/zero2_offload.json\""
        )
    if recipe.model.name_or_path == "random" and not recipe.model.init_config:
        raise RecipeError(f"{where}model.name_or_path = \"random\" needs a [model.init_config] table: model_type (default \"llama\") and that family's config values")
    if recipe.model.name_or_path == "random":
        _check_init_config(recipe.model.init_config, where)
    _check_sequence_parallel(recipe, where)
    if not recipe.model.name_or_path:
        raise RecipeError(f"{where}model.name_or_path is empty: give a hub id, a local directory, a .gguf file or \"random\"")


def _check_sequence_parallel(recipe: Recipe, where: str) -> None:
    """engine.sequence_parallel_size > 1: the DeepSpeed engine, a kernel that takes a 2-D mask, and
    (when the recipe gives the shape) heads that split over N ranks. The launch is checked at start."""
    size = recipe.engine.sequence_parallel_size
    if size <= 1:
        return
    if recipe.engine.name != "deepspeed":
        raise RecipeError(
            f"{where}engine.sequence_parallel_size = {size} needs engine.name = \"deepspeed\" (Ulysses, DeepSpeed's "
            f"ALST), not {recipe.engine.name!r}: accelerate's own sequence parallelism runs only through its DeepSpeed "
            f"plugin, which forms no multi-rank group on the CPU, and its context parallelism needs FSDP2 on CUDA "
            f"with torch's SDPA, not S2. Set engine.name = \"deepspeed\" and engine.deepspeed_config = "
            f"\"launch/deepspeed/zero2_sp.json\""
        )
    if recipe.attention.kernel == "eager":
        raise RecipeError(
            f"{where}attention.kernel = \"eager\" with engine.sequence_parallel_size = {size}: eager attention "
            f"builds a (B, 1, L, L) mask of one rank's shard, not of the whole sequence. Use attention.kernel = "
            f"\"sdpa\" or \"auto\""
        )
    init = recipe.model.init_config
    if recipe.model.name_or_path == "random" and "num_attention_heads" in init:
        from harness.backends.sequence_parallel import SequenceParallelError, check_heads

        heads = int(init["num_attention_heads"])
        try:
            check_heads(heads, int(init.get("num_key_value_heads") or heads), size)
        except SequenceParallelError as error:
            raise RecipeError(f"{where}{error}") from None


def _check_init_config(init_config: dict, where: str) -> None:
    """model_type names a causal-LM family of transformers ("llama" when absent), and every other
    [model.init_config] key is a field of that family's config class, of its type (before any weights)."""
    import inspect

    from harness.base_model import DEFAULT_MODEL_TYPE

    config_class = _init_config_class(init_config.get("model_type", DEFAULT_MODEL_TYPE), where)
    defaults = config_class().to_dict()
    known = set(defaults) | set(inspect.signature(config_class.__init__).parameters) | LEGACY_ROPE_KEYS
    for key, value in init_config.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" Did you mean model.init_config.{close[0]}?" if close else ""
            raise RecipeError(f"{where}unknown key model.init_config.{key}: {config_class.__name__} has no such "
                              f"field.{hint}")
        expected = type(defaults.get(key, value))
        if expected in (int, float, bool) and not _is_a(value, expected):
            raise RecipeError(f"{where}model.init_config.{key} = {value!r} has type {type(value).__name__}, expected "
                              f"{expected.__name__}{_type_hint(expected, value)}")


def _init_config_class(model_type, where: str):
    """transformers' config class of a causal-LM family, e.g. "qwen2" -> Qwen2Config."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    families = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if model_type not in families:
        close = difflib.get_close_matches(str(model_type), families, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{where}model.init_config.model_type = {model_type!r} is not a causal-LM family of "
                          f"transformers.{hint} Known: {', '.join(families)}")
    return CONFIG_MAPPING[model_type]


def _is_a(value, expected: type) -> bool:
    if isinstance(value, bool) or expected is bool:
        return isinstance(value, bool) and expected is bool
    return isinstance(value, int) if expected is int else isinstance(value, (int, float))


def _check_files(recipe: Recipe, where: str) -> None:
    model_path = recipe.model.name_or_path
    from harness.base_model import looks_local

    if looks_local(model_path) and not Path(model_path).expanduser().exists():
        raise RecipeError(f"{where}model.name_or_path = {model_path!r}: no such file or directory")
    if recipe.engine.deepspeed_config:
        find_relative(recipe.engine.deepspeed_config, recipe.source, key="engine.deepspeed_config", where=where)
    data_path = recipe.data.path
    if data_path and not data_path.startswith("hub:") and not any(ch in data_path for ch in "*?["):
        if Path(data_path).expanduser().is_symlink() and not Path(data_path).expanduser().exists():
            raise RecipeError(f"{where}data.path = {data_path!r} is a symbolic link that leads nowhere (a loop, or a "
                              f"missing target): point it at the data, or give the data's own path")
        if not Path(data_path).expanduser().exists():
            raise RecipeError(
                f"{where}data.path = {data_path!r}: no such file or directory. Give a file, a folder, a glob, "
                f"or \"hub:owner/name\" for a hub dataset (override with data.path=...)"
            )


def _check_output_outside_data(recipe: Recipe, where: str) -> None:
    """A run's own files (metrics, checkpoints) inside a data folder would be read as data by the next run."""
    output = Path(recipe.train.output_dir).expanduser().resolve()
    for key in ("path", "eval_path"):
        value = getattr(recipe.data, key)
        folder = Path(value).expanduser()
        if value and not value.startswith("hub:") and folder.is_dir() and output.is_relative_to(folder.resolve()):
            raise RecipeError(f"{where}train.output_dir = {recipe.train.output_dir!r} is inside data.{key} = "
                              f"{value!r}: the run's own files would be read as training data next time. Choose "
                              f"an output folder outside it")


def find_relative(name: str, recipe_source: str, *, key: str, where: str = "") -> Path:
    """A file named in a recipe: relative to the working directory, else to the recipe."""
    candidates = [Path(name).expanduser()]
    if recipe_source and not Path(name).is_absolute():
        candidates.append(Path(recipe_source).parent / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise RecipeError(f"{where}{key} = {name!r}: file not found (looked in {', '.join(map(str, candidates))})")


# --------------------------------------------------------------------------- resolution

def resolve(recipe: Recipe, *, world_size: int | None = None, original_context: int | None = None,
            weights_dtype: str = "", base_fingerprint: str = "") -> Recipe:
    """Fill `recipe.resolved`: rope factor, sequence length, S2 group size, batch sizes, and
    (from training) the dtype the frozen weights were loaded in."""
    from harness import policy

    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    original = original_context or recipe.model.original_context or _local_original_context(recipe.model)
    position = recipe.position
    seq_len = recipe.data.max_seq_length or position.target_length or original
    factor = position.factor
    if not factor and original and position.name != "none":
        factor = float(math.ceil(position.target_length / original))
    attention = recipe.attention
    group_size = 0
    if attention.name == "s2" and seq_len:
        try:
            group_size = policy.s2_group_size(seq_len, attention.group_ratio, attention.group_size)
        except policy.PolicyError as error:
            raise RecipeError(f"{recipe.source + ': ' if recipe.source else ''}{error}") from None
    effective = recipe.train.micro_batch_size * recipe.train.grad_accum * world_size
    resolved = Resolved(
        original_context=original, rope_factor=factor, seq_len=seq_len, group_size=group_size,
        weights_dtype=weights_dtype or recipe.resolved.weights_dtype, world_size=world_size, effective_batch_size=effective, tokens_per_step=effective * seq_len,
        best_eval_step=recipe.resolved.best_eval_step, best_eval_ppl=recipe.resolved.best_eval_ppl,
        base_fingerprint=base_fingerprint or recipe.resolved.base_fingerprint,
    )
    return dataclasses.replace(recipe, resolved=resolved)


def _local_config(model: ModelConfig) -> dict:
    """The model's config from the recipe's [model.init_config] or a local config.json; {} when unknown
    without downloading."""
    config_file = Path(model.name_or_path).expanduser() / "config.json"
    if model.name_or_path == "random":
        return model.init_config
    if config_file.is_file():
        import json

        return json.loads(config_file.read_text(encoding="utf-8"))
    return {}


def _local_original_context(model: ModelConfig) -> int:
    """The window from an inline or local config without downloading; 0 when unknown."""
    config = _local_config(model)
    if not config:
        return 0
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}  # a native rope's own window first
    return int(rope.get("original_max_position_embeddings") or config.get("max_position_embeddings", 0))


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe as TOML (atomically: temp file, then rename)."""
    import tomli_w

    from harness import atomic

    header = f"# Resolved recipe{f' from {recipe.source}' if recipe.source else ''}; load it with harness.recipe.load_recipe\n"
    atomic.write_text(path, header + tomli_w.dumps(recipe.to_dict()))
