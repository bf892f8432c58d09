"""Recipes: one TOML file per experiment, parsed into typed, frozen dataclasses.

    recipe = load_recipe("recipes/llama2_13b_12k.toml", overrides=["train.max_steps=10"])

Every table maps to one dataclass below. Unknown keys are rejected with their full dotted
path and a did-you-mean; values are checked against the field types; `validate` runs the
validators of harness.registry (the cross-field checks of harness.recipe_checks, backend names
included, then each backend's own). `resolve` computes the derived values (the PI factor,
the S2 group size, the effective batch size) into `recipe.resolved` from what the file and the
launch give; `with_launch_facts` derives them again with the facts only a run learns (the engine's
data-parallel replicas, the base's window, the weights dtype, the base's fingerprint); `save_recipe`
writes the whole resolved recipe back as TOML beside every checkpoint. A renamed key
(RENAMED_KEYS) still loads under its old name, with a warning in a recipe file.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import policy
from harness.errors import HarnessError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DTYPES = ("auto", "bf16", "fp16", "fp32")
LEGACY_ROPE_KEYS = {"rope_theta", "rope_scaling"}  # accepted by transformers' configs, stored in rope_parameters
# old key -> its new name: a recipe file with the old one loads, warned once; a saved recipe of an old run
# loads silently; both at once are refused
RENAMED_KEYS = {"train.cpu_cache_mb": "train.cpu_cache_mib"}
_WARNED_RENAMES: set[str] = set()


class RecipeError(HarnessError, ValueError):
    """A recipe that cannot be used; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = ""  # hub id, local HF directory, .gguf file, or "random" (init_config)
    gguf_file: str = ""  # a GGUF file inside name_or_path (hub repo or directory)
    tokenizer: str = ""  # "" = the model's own; "builtin:bytes" = offline byte tokenizer
    # "random": model_type (default llama) + its config kwargs
    init_config: dict[str, Any] = field(default_factory=dict)
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
    group_ratio: float = policy.S2_GROUP_RATIO  # S2 group size as a share of the sequence
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
class LayoutConfig:
    name: str = "contiguous"  # contiguous | pose (harness.backends.layout)
    chunks: int = 2  # pose: pieces of the window, separated by chunks - 1 random skips of positions


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
    # CPU: freed tensors kept for reuse, up to this many MiB (0 = none); needs release_cpu_memory
    cpu_cache_mib: int = 256
    offload_activations: bool = False  # GPU: keep checkpointed activations in pinned CPU memory
    fp32_frozen_weights: bool = False  # QLoRA: peft's fp32 cast of embeddings, norms, head (fp32 residual stream)
    tiled_mlp: bool = False  # MLP in sequence tiles, recomputed in backward (harness.tiled): long sequences
    log_every: int = 1
    # held-out perplexity every N steps and at the end; -1 = auto (~5% of training time), 0 = end only
    eval_every: int = -1
    # no data.eval_path / eval_fraction: hold out this many target-length training samples (0: none)
    eval_holdout: int = 4
    eval_batches: int = 0  # held-out samples scored at each evaluation; 0 = the whole held-out split
    eval_s2: bool = True  # also score the target length under S2 (where S2 trains)
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
    """Derived values, computed by `resolve` (at load) and `with_launch_facts` (in a run), saved with every
    checkpoint."""

    original_context: int = 0  # 0 = read from the model config at load time
    rope_factor: float = 0.0
    seq_len: int = 0  # tokens the model computes per training sample (data.max_seq_length)
    sample_length: int = 0  # tokens read per sample: seq_len, or the target under a skipping layout (pose)
    group_size: int = 0  # S2 group size at seq_len (0 for full attention)
    weights_dtype: str = ""  # what the frozen unquantized weights trained in (harness.policy); "" = not recorded
    world_size: int = 1  # data-parallel replicas: the ranks / engine.sequence_parallel_size (engine.data_world_size)
    effective_batch_size: int = 0  # sequences per optimizer step: micro_batch_size x grad_accum x world_size
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
    layout: LayoutConfig = field(default_factory=LayoutConfig)
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


def validate(recipe: Recipe) -> None:
    """Every validator of harness.registry, in order: the cross-field checks (harness.recipe_checks),
    then the backends' own; an error names the recipe's file."""
    from harness import registry

    where = f"{recipe.source}: " if recipe.source else ""
    for validator in registry.validators():
        try:
            validator(recipe)
        except RecipeError:
            raise
        except (HarnessError, ValueError) as error:
            raise RecipeError(f"{where}{error}") from None


def _expand_home(recipe: Recipe) -> Recipe:
    """"~" in the recipe's local paths means the home directory, as in a shell (not a folder named "~")."""
    def expanded(value: str) -> str:
        return os.path.expanduser(value) if value.startswith("~") else value

    return dataclasses.replace(
        recipe, train=dataclasses.replace(recipe.train, output_dir=expanded(recipe.train.output_dir)),
        data=dataclasses.replace(recipe.data, path=expanded(recipe.data.path),
                                 eval_path=expanded(recipe.data.eval_path)),
        model=dataclasses.replace(recipe.model, name_or_path=expanded(recipe.model.name_or_path)))


def read_saved_recipe(path: str | os.PathLike) -> Recipe:
    """A recipe saved beside a checkpoint, as it was resolved; files it names need not exist here. An
    old run's keys load under their new names (RENAMED_KEYS), without a warning: the file is a record."""
    try:
        tables = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise RecipeError(f"{path}: cannot read the saved recipe: {error}") from None
    return recipe_from_dict(tables, source=str(path), warn_renamed=False)


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


def recipe_from_dict(tables: dict[str, Any], *, source: str = "", warn_renamed: bool = True) -> Recipe:
    where = f"{source}: " if source else ""
    tables = _renamed(tables, where, warn=warn_renamed)
    return _build(Recipe, {k: v for k, v in tables.items()}, prefix="", where=where, source=source)


def _renamed(tables: dict[str, Any], where: str, *, warn: bool) -> dict[str, Any]:
    """The raw tables with every old key of RENAMED_KEYS under its new name; the first recipe of this
    process that uses one is warned, naming the new key. Both names at once: RecipeError naming both."""
    for old, new in RENAMED_KEYS.items():
        section, old_key = old.split(".")
        new_key = new.split(".")[1]
        table = tables.get(section)
        if not isinstance(table, dict) or old_key not in table:
            continue
        if new_key in table:
            raise RecipeError(f"{where}{old} and {new} are both set: {old} is the old name of {new}. Keep {new} "
                              f"only")
        table = {(new_key if key == old_key else key): value for key, value in table.items()}
        tables = {**tables, section: table}
        if warn and old not in _WARNED_RENAMES:
            _WARNED_RENAMES.add(old)
            logging.getLogger("harness").warning("%s%s is deprecated: rename it %s (the same setting)", where, old,
                                                 new)
    return tables


def _build(cls, values: dict[str, Any], *, prefix: str, where: str, source: str = ""):
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else f" Known keys: {', '.join(known)}."
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
                      f"{type_hint(hint, value)}")


def type_hint(hint, value) -> str:
    """How to write the value: unquoted when the string is one, else an example of the type."""
    examples = {int: "an integer, e.g. 10", float: "a number, e.g. 2e-4", bool: "true or false"}
    if not isinstance(value, str) or hint not in examples:
        return ""
    try:
        quoted = value.lower() in ("true", "false") if hint is bool else hint(value) is not None
    except ValueError:
        quoted = False
    return f" (write {value} without quotes)" if quoted else f" (write {examples[hint]})"


# --------------------------------------------------------------------------- files named in a recipe

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

def resolve(recipe: Recipe) -> Recipe:
    """Fill `recipe.resolved` with what the file and the launch give (load_recipe, --dry-run): rope factor,
    sequence length, S2 group size and batch sizes, with the launch's data-parallel replicas (WORLD_SIZE /
    engine.sequence_parallel_size: what training counts, engine.data_world_size) and the original window
    of model.original_context, else of a local config (0 when only the base's download would tell)."""
    replicas = policy.data_world_size(policy.launched_world_size(), recipe.engine.sequence_parallel_size)
    return with_launch_facts(recipe, world_size=replicas)


def with_launch_facts(recipe: Recipe, *, world_size: int, original_context: int = 0, weights_dtype: str = "",
                      base_fingerprint: str = "") -> Recipe:
    """`recipe.resolved` derived again with facts of this launch that the file does not give: harness.train
    adds the engine's world size to find where to start, harness.session.build_session every fact, once
    the base is found. The facts, and what they fill:

        world_size        resolved.world_size, the data-parallel replicas (engine.data_world_size), and so
                          resolved.effective_batch_size and tokens_per_step
        original_context  resolved.original_context (the base's config; 0: model.original_context, else
                          a local config, as at load), and so rope_factor, seq_len, sample_length,
                          group_size and tokens_per_step
        weights_dtype     resolved.weights_dtype (what the frozen weights load in here; "": kept)
        base_fingerprint  resolved.base_fingerprint (the base's weight files; "": kept)

    The best evaluation's step and perplexity are kept."""
    original = original_context or recipe.model.original_context or original_window(local_config(recipe.model))
    position = recipe.position
    seq_len = recipe.data.max_seq_length or position.target_length or original
    factor = position.factor
    if position.name != "none":
        factor = policy.interpolation_factor(position.target_length, original, factor)
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
        sample_length=sample_length(recipe.layout.name, seq_len, position.target_length),
        weights_dtype=weights_dtype or recipe.resolved.weights_dtype, world_size=world_size,
        effective_batch_size=effective, tokens_per_step=effective * seq_len,
        best_eval_step=recipe.resolved.best_eval_step, best_eval_ppl=recipe.resolved.best_eval_ppl,
        base_fingerprint=base_fingerprint or recipe.resolved.base_fingerprint,
    )
    return dataclasses.replace(recipe, resolved=resolved)


def sample_length(layout: str, seq_len: int, target_length: int) -> int:
    """Tokens read per training sample: the window, or under any layout but contiguous the target
    (the layout kind's contract, harness.backends.layout)."""
    return seq_len if layout == "contiguous" else max(seq_len, target_length)


def local_config(model: ModelConfig) -> dict:
    """The model's config from the recipe's [model.init_config] or a local config.json; {} when unknown
    without downloading."""
    config_file = Path(model.name_or_path).expanduser() / "config.json"
    if model.name_or_path == "random":
        return model.init_config
    if config_file.is_file():
        import json

        return json.loads(config_file.read_text(encoding="utf-8"))
    return {}


def original_window(config) -> int:
    """The window a model was pretrained with, as its config records it before any position backend
    stretches it: a transformers config, or the dict of a config.json / [model.init_config]. A native
    scaled rope's original_max_position_embeddings (LLaMA 3.1's), read from the rope table of the layers
    that see the whole sequence where each layer type has its own (Gemma 3), or beside it (Phi-3's
    config.json: transformers moves it into the table), else max_position_embeddings; 0 when the config
    gives neither. The one reading of it: resolve at load (a local config, local_config),
    harness.backends.position before it stretches the rope, harness.generation after."""
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    rope = dict(get("rope_parameters") or get("rope_scaling") or {})
    layer_types = get("layer_types") or ()
    if any(key in layer_types for key in rope):  # one table per layer type: the first that is not sliding
        rope = next((dict(table) for key, table in rope.items()
                     if key in layer_types and table is not None and not key.startswith("sliding")), {})
    return int(rope.get("original_max_position_embeddings") or get("original_max_position_embeddings")
               or get("max_position_embeddings") or 0)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe as TOML (atomically: temp file, then rename)."""
    import tomli_w

    from harness import atomic

    header = (f"# Resolved recipe{f' from {recipe.source}' if recipe.source else ''}; "
              f"load it with harness.recipe.load_recipe\n")
    atomic.write_text(path, header + tomli_w.dumps(recipe.to_dict()))
