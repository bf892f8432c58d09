"""What the two conversions share (harness.zero_export, harness.merge): their error, the report
of what they wrote, the trained run's recipe and base model, and the output check.

Bad input raises ConvertError, one line that names the input and the fix (tools/convert.py
prints it and exits 2). The output directory is written through harness.atomic.atomic_dir:
it appears complete or not at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness import rundir
from harness.atomic import check_output
from harness.errors import HarnessError, first_line
from harness.recipe import Recipe


class ConvertError(HarnessError):
    """Unusable input; the message is one line that names the input and the fix."""


@dataclass
class Verification:
    max_abs_diff: float
    tolerance: float  # absolute: relative tolerance x scale
    scale: float  # max |logit| of the reference
    tokens: int


@dataclass
class Report:
    """What a conversion wrote; the command line shows it as a table."""

    out: Path
    tensors: int
    dtype: str
    rope: dict
    notes: list[str] = field(default_factory=list)  # "key: value" lines
    verification: Verification | None = None


def read_lora_recipe(directory: Path) -> Recipe:
    """The saved recipe of a LoRA run (a full fine-tune has no adapter to convert)."""
    recipe = rundir.read_recipe(directory)
    if recipe.adapter.name != "lora":
        raise ConvertError(f"{directory / rundir.RECIPE_FILE}: adapter.name = {recipe.adapter.name!r}: a full "
                           f"fine-tune has no adapter; use DeepSpeed's zero_to_fp32 for its weights")
    return recipe


def base_config(recipe: Recipe, base: str | None):
    """The base's config, name_or_path set to where its weights are: `base` (--base), else the
    recipe's model materialized as training materialized it."""
    from transformers import AutoConfig

    from harness.base_model import materialize

    cfg = recipe.model
    try:
        path = base or materialize(cfg.name_or_path, init_config=cfg.init_config, init_seed=cfg.init_seed,
                                   gguf_file=cfg.gguf_file)
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:  # BaseModelError is a ValueError
        where = "--base" if base else "the recipe's model.name_or_path"
        raise ConvertError(f"{where} {base or cfg.name_or_path}: cannot load it: {first_line(error)}") from None
    config.name_or_path = path
    return config


def check_out(out: Path, overwrite: bool, inputs: list[tuple[str, str | Path | None]]) -> None:
    """OUT, replaced whole on success: never an input or inside one or holding one, never in the
    harness's base-model cache nor a training run's export or checkpoint (even with --overwrite),
    writable, and not a run of its own unless --overwrite says so."""
    from harness.base_model import cache_root

    check_output("OUT", out, inputs, is_file=False)
    cache = cache_root().resolve()
    if out.expanduser().resolve().is_relative_to(cache):
        raise ConvertError(f"OUT {out} lies inside the harness's model cache {cache} (HARNESS_CACHE), whose bases "
                           f"every run loads: choose an OUT outside it")
    if (out / rundir.STATE_FILE).is_file():
        raise ConvertError(f"OUT {out} is a training run's export or checkpoint (it holds {rundir.STATE_FILE}): "
                           f"replacing it would lose that step's files; choose another OUT")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"{out}: already exists and is not empty; choose another OUT or pass --overwrite")


def short_dtype(name: str) -> str:
    """torch / config.json dtype names -> the harness's: "bfloat16" -> "bf16"."""
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(name.removeprefix("torch."), "fp32")
