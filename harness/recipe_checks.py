"""Cross-field checks of a resolved recipe, the first validator of harness.registry.

    validate(recipe)    # raises RecipeError naming the file, the key, the value and the fix

harness.recipe.load_recipe runs every registered validator: this module's first (harness.registry
orders the validators as its built-in modules are listed), then the backends' own (sequence
parallelism's).
This module builds on the recipe's schema, so the recipe reaches it only through the registry.
Each allowed name is asked of its owner (harness.policy's kernels and optimizers,
harness.metrics' trackers); nothing here imports a backend: the names a backend alone takes are its
own validator's (data.mode and data.format: harness.data.backends, with check_choice).
"""
from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path

from harness import metrics, policy, registry
from harness.recipe import DTYPES, LEGACY_ROPE_KEYS, Recipe, RecipeError, find_relative, local_config, type_hint

MAX_SANE_LR = 0.1  # above it, train.lr is warned about

# What the testbed grid measured of the paper's pairing (docs/experiments.md, "Does S2 training transfer
# to full attention?"): warned about at load (validate), and named by the long-context watch when it fires
# (harness.evaluation.in_training).
PI_S2_DOES_NOT_TRANSFER = (
    "position.name = \"linear\" with attention.name = \"s2\" (the paper's pairing): on the testbed grid, adapters "
    "trained this way broke under full attention past their S2 group, the way users serve them; position.name = "
    "\"yarn\" with S2 held. docs/experiments.md, \"Does S2 training transfer to full attention?\""
)


@registry.register_validator
def validate(recipe: Recipe) -> None:
    """Cross-field checks of a resolved recipe: choices, lengths, combinations, files, backend names."""
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


def check_choice(where: str, key: str, value, choices) -> None:
    """RecipeError unless `value` is one of `choices`, with the closest one as a suggestion."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{where}{key} = {value!r} is not one of {', '.join(map(repr, choices))}.{hint}")


def _check_choices(recipe: Recipe, where: str) -> None:
    check_choice(where, "model.dtype", recipe.model.dtype, DTYPES)
    check_choice(where, "quantization.compute_dtype", recipe.quantization.compute_dtype, DTYPES)
    check_choice(where, "quantization.storage_dtype", recipe.quantization.storage_dtype, ("uint8",) + DTYPES)
    check_choice(where, "attention.kernel", recipe.attention.kernel, policy.KERNELS)
    check_choice(where, "adapter.bias", recipe.adapter.bias, ("none", "all", "lora_only"))
    check_choice(where, "train.scheduler", recipe.train.scheduler, ("constant_with_warmup", "cosine", "linear"))
    check_choice(where, "train.optimizer", recipe.train.optimizer, policy.OPTIMIZERS)
    check_choice(where, "train.precision", recipe.train.precision, DTYPES)
    check_choice(where, "train.resume", recipe.train.resume, ("never", "auto"))
    for index, tracker in enumerate(recipe.train.report_to):
        check_choice(where, f"train.report_to[{index}]", tracker, tuple(metrics.TRACKERS))


def _positive(where: str, key: str, value, *, allow_zero: bool = False) -> None:
    """value > 0 (>= 0 with allow_zero), and finite: NaN compares false with everything and passes a
    plain bound check, then trains a NaN model."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise RecipeError(f"{where}{key} = {value!r} must be a finite number {bound}")


def _check_lengths(recipe: Recipe, where: str) -> None:
    position, train = recipe.position, recipe.train
    _positive(where, "position.factor", position.factor, allow_zero=True)
    _positive(where, "data.max_seq_length", recipe.data.max_seq_length, allow_zero=True)
    if position.name != "none":
        _positive(where, "position.target_length", position.target_length)
        check_position(recipe, recipe.resolved.original_context)
        _check_sequence_within_target(recipe, where)
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
    if train.eval_every < -1:
        raise RecipeError(f"{where}train.eval_every = {train.eval_every} must be -1 "
                          f"(auto: about {policy.EVAL_SHARE:.0%} of the training time), 0 (only at the end) "
                          f"or a number of steps")
    _positive(where, "train.eval_holdout", train.eval_holdout, allow_zero=True)
    _positive(where, "train.eval_batches", train.eval_batches, allow_zero=True)
    _positive(where, "train.eval_rises", train.eval_rises, allow_zero=True)
    if train.eval_stop and not train.eval_rises:
        raise RecipeError(f"{where}train.eval_stop = true needs train.eval_rises > 0 (how many rises in a row stop "
                          f"the run), e.g. train.eval_rises = 2")
    _positive(where, "train.cpu_cache_mib", train.cpu_cache_mib, allow_zero=True)
    _positive(where, "engine.sequence_parallel_size", recipe.engine.sequence_parallel_size)
    if train.max_steps <= 0 and train.epochs <= 0:
        raise RecipeError(f"{where}train.max_steps = {train.max_steps} and train.epochs = {train.epochs}: "
                          f"set one of them > 0")
    attention = recipe.attention
    try:
        policy.check_s2_group(attention.group_ratio, attention.group_size)
    except policy.PolicyError as error:
        raise RecipeError(f"{where}{error}") from None
    seq_len = recipe.resolved.seq_len
    if attention.name == "s2" and seq_len and attention.group_size > seq_len:
        raise RecipeError(f"{where}attention.group_size = {attention.group_size} is longer than the training sequence "
                          f"of {seq_len} tokens: choose a group of at most {seq_len // 2 * 2} tokens, or 0 to use "
                          f"attention.group_ratio")
    if not 0 <= recipe.data.eval_fraction < 1:
        raise RecipeError(f"{where}data.eval_fraction = {recipe.data.eval_fraction} must be in [0, 1)")


def _check_sequence_within_target(recipe: Recipe, where: str) -> None:
    """Training sequences no longer than the window the adapter's rope is saved for."""
    length, target = recipe.data.max_seq_length, recipe.position.target_length
    if length > target and recipe.layout.name != "contiguous":  # the window must stay below the target
        raise RecipeError(f"{where}data.max_seq_length = {length} is longer than position.target_length = {target}, "
                          f"but layout.name = {recipe.layout.name!r} trains a window shorter than the target: lower "
                          f"data.max_seq_length, e.g. to {max(target // 4, 1)}")
    if length > target:
        raise RecipeError(f"{where}data.max_seq_length = {length} is longer than position.target_length = {target}: "
                          f"training would run past the rope the adapter is saved with. Raise position.target_length "
                          f"to {length}, or lower data.max_seq_length to at most {target}")


def check_position(recipe: Recipe, original: int) -> None:
    """position.factor and target_length against the model's original window `original` (0: not
    known yet); asked at recipe load when the recipe or a local config gives the window, and by
    harness.model once the config loads."""
    position = recipe.position
    if position.name == "none":
        return
    where = f"{recipe.source}: " if recipe.source else ""
    target, factor = position.target_length, position.factor
    if factor and factor < 1:
        raise RecipeError(f"{where}position.factor = {factor:g} is below 1: it would shrink the rope, not stretch it. "
                          f"Use a factor >= 1, or 0 to derive it from position.target_length")
    if not original:
        return
    if 0 < target < original:
        raise RecipeError(
            f"{where}position.target_length = {target} is shorter than the model's original context of "
            f"{original} tokens: context extension needs a longer target (e.g. {2 * original}), or "
            f"position.name = \"none\""
        )
    if factor and factor * original < target:
        raise RecipeError(
            f"{where}position.factor = {factor:g} stretches the original context of {original} tokens to "
            f"{factor * original:g}, short of position.target_length = {target}: use a factor of at least "
            f"{target / original:g}, or 0 to derive it (ceil({target} / {original}) = {math.ceil(target / original)})"
        )


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
    hidden = local_config(recipe.model).get("hidden_size")
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
        raise RecipeError(f"{where}model.name_or_path = \"random\" needs a [model.init_config] table: "
                          f"model_type (default \"llama\") and that family's config values")
    if recipe.model.name_or_path == "random":
        _check_init_config(recipe.model.init_config, where)
    if not recipe.model.name_or_path:
        raise RecipeError(f"{where}model.name_or_path is empty: "
                          f"give a hub id, a local directory, a .gguf file or \"random\"")


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
                              f"{expected.__name__}{type_hint(expected, value)}")


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
