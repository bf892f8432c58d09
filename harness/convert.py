"""From checkpoint to usable model: ZeRO state -> PEFT adapter, adapter + base -> merged model.

    report = zero_to_adapter("runs/x/checkpoint-500", "runs/x/adapter-500")
    report = merge("runs/x/final", "runs/x/merged", dtype="bf16", verify=True)
    verification = verify_merged("runs/x/merged", "runs/x/final")

zero_to_adapter reads the fp32 master weights of a ZeRO-2/3 checkpoint in-process (DeepSpeed's
zero_to_fp32 functions, no separate step), keeps the trainable tensors (LoRA A/B, the
modules_to_save copies of embeddings and norms) under PEFT's saved key names, and checks them
against the LoRA the recipe builds on an empty (meta) copy of the base: same key set, same
shapes, no empty ZeRO-3 shard.

merge never merges into 4-bit weights. The base is loaded unquantized in fp32 with the
extended rope of rope_parameters.json, the adapter is merged there, and the result is cast to
the target dtype. Which 16-bit weights the adapter is added to is a choice (`base_weights`):

    dequantized  (default) each weight the recipe quantized goes through an NF4 round trip
                 (bitsandbytes quantize_4bit -> dequantize_4bit, the recipe's double-quant
                 setting, blocksize 64): exactly the weights QLoRA trained against, so the
                 merged model computes what the trained model computed. NF4's rounding error
                 is baked into the merged weights.
    original     the base's own 16-bit weights. The adapter learned a correction for the NF4
                 weights, so the merged model differs from the trained one by the quantization
                 error (W - NF4(W)) in every quantized layer; closer to the base, not to training.

A recipe trained without quantization (quantization.name = "none") uses the original weights
either way. The NF4 round trip starts from the weights in the dtype training loaded them in:
model.dtype, or for "auto" the quantization compute dtype, as the harness loads on a GPU (a
compute dtype of "auto" resolved on this machine: bf16 / fp16 on GPUs, fp32 on the CPU, which
is also what CPU recipes such as recipes/tiny_cpu.toml trained with). A recipe does not say
which device trained it, so model.dtype = "auto" + a 16-bit compute dtype trained on the CPU
would round-trip from bf16 instead of fp32: a few weights on NF4 code boundaries may differ.

Bad input raises ConvertError (one line, the CLI exits 2); a failed verification raises
VerifyError (the CLI exits 1). The command line is `main`, behind tools/convert.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from harness.errors import HarnessError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RECIPE = "recipe.toml"
ROPE = "rope_parameters.json"
PEFT_ROOT = "base_model.model."  # where a PeftModel's own parameter names start
NF4_BLOCKSIZE = 64  # bitsandbytes' Linear4bit default, which transformers' loader uses
# Default --verify tolerance: the largest |merged - reference| logit allowed, as a share of
# the reference's largest |logit|. fp32 only sees summation-order rounding; 16-bit merged
# weights add one rounding of every weight (bf16 keeps 8 mantissa bits, fp16 11).
TOLERANCES = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}
VERIFY_TOKENS = 128  # sampled token ids in the verification forward pass


class ConvertError(HarnessError):
    """Unusable input; the message is one line that names the input and the fix."""


class VerifyError(HarnessError):
    """The merged model's logits differ from base + adapter by more than the tolerance."""

    exit_code = 1


@dataclass
class Verification:
    max_abs_diff: float
    tolerance: float  # absolute: relative tolerance x scale
    scale: float  # max |logit| of the reference
    tokens: int


@dataclass
class Report:
    """What a conversion wrote; print_report shows it as a table."""

    out: Path
    tensors: int
    dtype: str
    rope: dict
    notes: list[str] = field(default_factory=list)
    verification: Verification | None = None


# --------------------------------------------------------------------------- ZeRO -> adapter

def zero_to_adapter(checkpoint: str | Path, out: str | Path, *, tag: str | None = None,
                    recipe_file: str | Path | None = None, base: str | None = None,
                    overwrite: bool = False) -> Report:
    """A ZeRO-2/3 checkpoint (harness checkpoint dir or bare DeepSpeed folder) -> PEFT adapter dir.

    recipe.toml, adapter_config.json and rope_parameters.json come from the folder of
    `recipe_file`, else from the checkpoint dir or the folder holding its DeepSpeed folder.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    deepspeed_dir, tag = find_deepspeed_checkpoint(checkpoint, tag)
    sidecars = _sidecar_dir(checkpoint, deepspeed_dir, recipe_file)
    recipe = _read_recipe(sidecars / RECIPE)
    _check_out(out, overwrite)
    config = _base_config(recipe, base)
    peft_model = _meta_peft_model(recipe, config, sidecars)
    weights = _zero_trainable_weights(deepspeed_dir, tag)
    state = adapter_state_dict(peft_model, weights, where=str(checkpoint))
    rope = _read_rope(sidecars) if (sidecars / ROPE).is_file() else derive_rope(recipe, config)
    with _writing(out) as tmp:
        _save_safetensors(state, tmp / ADAPTER_WEIGHTS)
        _write_adapter_config(peft_model, sidecars, tmp, config.name_or_path)
        shutil.copyfile(sidecars / RECIPE, tmp / RECIPE)
        (tmp / ROPE).write_text(json.dumps(rope, indent=2), encoding="utf-8")
    return Report(out, len(state), _dtypes(state.values()), rope,
                  notes=[f"source: {deepspeed_dir / tag} (fp32 master weights)"])


def find_deepspeed_checkpoint(checkpoint: Path, tag: str | None = None) -> tuple[Path, str]:
    """(folder with `latest` and the tag folders, tag) for a harness checkpoint dir, a DeepSpeed
    save folder or a tag folder itself."""
    if not checkpoint.is_dir():
        raise ConvertError(f"{checkpoint}: no such checkpoint directory")
    found = None
    for folder in (checkpoint / "deepspeed", checkpoint):
        if tag and (folder / tag).is_dir():
            found = folder, tag
        elif not tag and (folder / "latest").is_file():
            found = folder, (folder / "latest").read_text(encoding="utf-8").strip()
        if found:
            break
    if found is None and any(checkpoint.glob("*model_states.pt")):
        found = checkpoint.parent, checkpoint.name
    if found is None:
        raise ConvertError(
            f"{checkpoint}: no DeepSpeed checkpoint in it (looked for {'tag ' + tag if tag else 'a latest file'} in "
            f"{checkpoint / 'deepspeed'} and {checkpoint}). A checkpoint of the accelerate engine already holds "
            f"{ADAPTER_WEIGHTS}: pass it to `merge` directly"
        )
    _check_zero_files(found[0] / found[1])
    return found


def _check_zero_files(tag_dir: Path) -> None:
    for pattern in ("*model_states.pt", "*optim_states.pt"):
        if not any(tag_dir.glob(pattern)):
            raise ConvertError(f"{tag_dir}: incomplete DeepSpeed checkpoint, no {pattern} file in it")


def _sidecar_dir(checkpoint: Path, deepspeed_dir: Path, recipe_file) -> Path:
    if recipe_file is not None:
        if not Path(recipe_file).is_file():
            raise ConvertError(f"--recipe {recipe_file}: no such file")
        return Path(recipe_file).parent
    for folder in (checkpoint, deepspeed_dir.parent):
        if (folder / RECIPE).is_file():
            return folder
    raise ConvertError(f"{checkpoint}: no {RECIPE} beside the DeepSpeed checkpoint; pass the training recipe "
                       f"with --recipe")


def _zero_trainable_weights(deepspeed_dir: Path, tag: str) -> dict:
    """{name: fp32 tensor} of the parameters the optimizer held, gathered over all ZeRO ranks."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(deepspeed_dir), tag=tag, exclude_frozen_parameters=True)
    except (OSError, ValueError, KeyError) as error:
        raise ConvertError(f"{deepspeed_dir / tag}: DeepSpeed cannot read it: {error}") from None


def _meta_peft_model(recipe, config, sidecars: Path):
    """The recipe's LoRA on an empty (meta-device) base: every name and shape, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
        if (sidecars / ADAPTER_CONFIG).is_file():
            from peft import LoraConfig, get_peft_model

            peft_config = LoraConfig.from_pretrained(str(sidecars))
            peft_config.inference_mode = False  # saved as True; trainable = what the optimizer held
            return get_peft_model(model, peft_config)
        from harness import registry

        backend = registry.get("adapter", recipe.adapter.name, key="adapter.name")
        return backend.fn(model, **registry.table_kwargs(backend, recipe.adapter))


def adapter_state_dict(peft_model, weights: dict, *, where: str) -> dict:
    """ZeRO weights -> PEFT's saved format (adapter name ".default" dropped), checked.

    `weights` are named as in the training engine's module (the harness wraps the PeftModel in
    CausalLMLoss: "model.base_model.model...."); they must be exactly the trainable parameters
    of `peft_model`, each non-empty and of the same shape.
    """
    from peft import get_peft_model_state_dict

    renamed = {_peft_name(name, where): tensor for name, tensor in weights.items()}
    expected = {name: p.shape for name, p in peft_model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected.keys() - renamed.keys()), sorted(renamed.keys() - expected.keys())
    if missing or unexpected:
        raise ConvertError(
            f"{where}: its trainable tensors are not the recipe's adapter: {len(missing)} missing "
            f"{missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}; check --recipe / --base"
        )
    for name, tensor in renamed.items():
        if tensor.numel() == 0:
            raise ConvertError(f"{where}: {name} came out empty (a ZeRO-3 shard that was never gathered)")
        if tensor.shape != expected[name]:
            raise ConvertError(f"{where}: {name} has shape {tuple(tensor.shape)}, the recipe's adapter on this "
                               f"base expects {tuple(expected[name])}; pass the base it was trained on with --base")
    # Views of ZeRO's flat fp32 partitions: copy, so safetensors sees independent tensors.
    peft_model.load_state_dict({k: v.clone().contiguous() for k, v in renamed.items()}, strict=False, assign=True)
    return get_peft_model_state_dict(peft_model, save_embedding_layers=False)


def _peft_name(name: str, where: str) -> str:
    start = name.find(PEFT_ROOT)
    if start < 0:
        raise ConvertError(f"{where}: parameter {name!r} is not inside a PEFT model; zero-to-adapter needs a "
                           f"LoRA run (adapter.name = \"lora\")")
    return name[start:]


def _write_adapter_config(peft_model, sidecars: Path, out: Path, base_path: str) -> None:
    """The checkpoint's adapter_config.json as it is, or the recipe's LoRA config."""
    if (sidecars / ADAPTER_CONFIG).is_file():
        shutil.copyfile(sidecars / ADAPTER_CONFIG, out / ADAPTER_CONFIG)
        return
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = base_path
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    config.save_pretrained(str(out))


def derive_rope(recipe, config) -> dict:
    """rope_parameters.json contents the recipe's position backend gives this base config (edits it)."""
    from harness import registry
    from harness.backends.position import original_context_of

    original = original_context_of(config, recipe.model.original_context)
    try:
        backend = registry.get("position", recipe.position.name, key="position.name")
        backend.fn(config, **registry.table_kwargs(backend, recipe.position), original_context=original)
    except ValueError as error:  # BackendError, PositionError
        raise ConvertError(f"{recipe.source}: cannot rebuild the rope parameters: {error}") from None
    return {"rope_parameters": config.rope_parameters, "max_position_embeddings": config.max_position_embeddings,
            "original_context": original}


# --------------------------------------------------------------------------- merge

def merge(adapter: str | Path, out: str | Path, *, base: str | None = None, dtype: str = "bf16",
          base_weights: str = "dequantized", verify: bool = False, tolerance: float | None = None,
          overwrite: bool = False) -> Report:
    """Adapter (+ modules_to_save) merged into a 16-bit base -> HF model + tokenizer in `out`.

    With `verify`, the written model is checked (verify_merged) before `out` is put in place;
    a mismatch raises VerifyError and leaves no `out`.
    """
    adapter, out = _adapter_dir(Path(adapter)), Path(out)
    recipe = _read_recipe(adapter / RECIPE)
    rope = _read_rope(adapter)
    _check_out(out, overwrite)
    from harness.backends.quantization import TORCH_DTYPES  # torch: only once the input is checked

    model, base_path, regime = load_base(recipe, rope, base=base, base_weights=base_weights)
    merged = _attach_adapter(model, adapter).merge_and_unload()  # fp32 W + B A * alpha/r, wrappers removed
    merged.to(TORCH_DTYPES[dtype])
    verification = None
    with _writing(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        _tokenizer(recipe, base_path).save_pretrained(str(tmp))
        tensors = _count_tensors(tmp)
        del model, merged
        if verify:
            verification = verify_merged(tmp, adapter, base=base, base_weights=base_weights, tolerance=tolerance)
    return Report(out, tensors, dtype, rope, notes=[f"base: {base_path}", f"base weights: {regime}"],
                  verification=verification)


def load_base(recipe, rope: dict, *, base: str | None = None, base_weights: str = "dequantized"):
    """(fp32 model with the extended rope, base path, regime in words), weights as `base_weights` says."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.backends.quantization import TORCH_DTYPES, device_dtype

    config = _base_config(recipe, base)
    config.rope_parameters = rope["rope_parameters"]
    config.max_position_embeddings = rope["max_position_embeddings"]
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a 16-bit merge of a pre-quantized base must not claim quantization
    nf4, regime = weights_regime(recipe, base_weights)
    try:
        model = AutoModelForCausalLM.from_pretrained(config.name_or_path, config=config, dtype=torch.float32,
                                                     trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConvertError(f"base model {config.name_or_path}: cannot load its weights: {_first_line(error)}") from None
    if nf4:
        loaded_as = recipe.model.dtype
        if loaded_as == "auto":  # the GPU rule of harness.model: the compute dtype
            loaded_as = device_dtype(recipe.quantization.compute_dtype)
        load_dtype = TORCH_DTYPES[loaded_as]
        for module in quantized_linears(model):
            module.weight.data = nf4_round_trip(module.weight.data, double_quant=recipe.quantization.double_quant,
                                                dtype=load_dtype)
    return model.eval(), config.name_or_path, regime


def weights_regime(recipe, base_weights: str) -> tuple[bool, str]:
    """(NF4 round trip or not, the choice in words) for --base-weights and the recipe's quantization."""
    quantization = recipe.quantization.name
    if quantization == "none":
        return False, "original (trained unquantized)"
    if base_weights == "original":
        return False, "original (the adapter was trained against their NF4 rounding)"
    if quantization != "nf4":
        raise ConvertError(f"--base-weights dequantized supports quantization.name = \"nf4\", this recipe used "
                           f"{quantization!r}; pass --base-weights original")
    return True, "NF4 round trip (what QLoRA trained against)"


def quantized_linears(model) -> list:
    """The nn.Linear modules transformers' bitsandbytes loader turns into Linear4bit: all but the
    output head, tied weights and the model's keep-in-fp32 modules (its own rule, reused)."""
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    return [module for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and should_convert_module(name, skip)]


def nf4_round_trip(weight, *, double_quant: bool, dtype):
    """dequantize(quantize_nf4(weight in `dtype`)) as fp32: (out, in) -> (out, in).

    The same calls, block size and statistics compression that Linear4bit makes when the
    weights load, so the result equals the training model's dequantized weight bit for bit.
    """
    import bitsandbytes.functional as bnb_f
    import torch

    packed, state = bnb_f.quantize_4bit(weight.to(dtype), blocksize=NF4_BLOCKSIZE,
                                        compress_statistics=double_quant, quant_type="nf4")
    return bnb_f.dequantize_4bit(packed, state).to(torch.float32)


def _attach_adapter(model, adapter: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError) as error:
        if "size mismatch" in str(error):
            raise ConvertError(f"{adapter}: the adapter was made for a different base model (weight shapes differ); "
                               f"pass the base it was trained on with --base") from None
        raise ConvertError(f"{adapter}: cannot apply the adapter to this base: {_first_line(error)}") from None


def _tokenizer(recipe, base_path: str):
    from harness.tokenizer import load_tokenizer

    name = recipe.model.tokenizer or base_path
    try:
        return load_tokenizer(name)
    except (OSError, ValueError) as error:
        raise ConvertError(f"tokenizer {name}: cannot load it: {_first_line(error)}") from None


# --------------------------------------------------------------------------- verification

def verify_merged(merged: str | Path, adapter: str | Path, *, base: str | None = None,
                  base_weights: str = "dequantized", tolerance: float | None = None) -> Verification:
    """Logits of the merged model vs the unmerged base + adapter (same base regime), fp32.

    The merged weights are read as saved and upcast to fp32, so only their rounding to the
    saved dtype shows, not 16-bit arithmetic. Tolerance: `tolerance` (else TOLERANCES of the
    saved dtype) times the reference's largest |logit|, on VERIFY_TOKENS sampled token ids.
    """
    import torch
    from transformers import AutoModelForCausalLM

    merged, adapter = Path(merged), _adapter_dir(Path(adapter))
    recipe = _read_recipe(adapter / RECIPE)
    model, _, _ = load_base(recipe, _read_rope(adapter), base=base, base_weights=base_weights)
    reference = _attach_adapter(model, adapter).eval()
    ids = _sample_ids(reference.config.vocab_size, min(VERIFY_TOKENS, reference.config.max_position_embeddings))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits  # (1, tokens, vocab), fp32
        del reference, model
        try:
            candidate_model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
        except (OSError, ValueError) as error:
            raise ConvertError(f"{merged}: cannot load the merged model: {_first_line(error)}") from None
        candidate = candidate_model(input_ids=ids).logits
    saved_dtype = json.loads((merged / "config.json").read_text(encoding="utf-8")).get("dtype", "float32")
    relative = tolerance if tolerance is not None else TOLERANCES[_short_dtype(saved_dtype)]
    return compare_logits(expected, candidate, relative=relative)


def compare_logits(expected, candidate, *, relative: float) -> Verification:
    """Max |candidate - expected| against relative x max |expected|; VerifyError past it."""
    scale = float(expected.abs().max())
    result = Verification(float((candidate - expected).abs().max()), relative * scale, scale, expected.shape[-2])
    if not result.max_abs_diff <= result.tolerance:  # NaN fails too
        raise VerifyError(
            f"merged model's logits differ from base + adapter: max |diff| {result.max_abs_diff:.3g} > tolerance "
            f"{result.tolerance:.3g} ({relative:g} x max |logit| {scale:.3g}) on {result.tokens} sampled tokens"
        )
    return result


def _sample_ids(vocab_size: int, length: int):
    """(1, length) token ids drawn with a fixed seed, independent of the global RNG."""
    import torch

    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


def _short_dtype(name: str) -> str:
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(name, "fp32")


# --------------------------------------------------------------------------- shared helpers

def _adapter_dir(path: Path) -> Path:
    if not path.is_dir():
        raise ConvertError(f"{path}: no such adapter or checkpoint directory")
    if not (path / ADAPTER_WEIGHTS).is_file() and (path / "deepspeed").is_dir():
        raise ConvertError(f"{path}: holds DeepSpeed state but no {ADAPTER_WEIGHTS}; run "
                           f"`tools/convert.py zero-to-adapter {path} OUT` first and merge OUT")
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, RECIPE, ROPE):
        if not (path / name).is_file():
            raise ConvertError(f"{path}: {name} is missing; pass a checkpoint or final/ directory written by the "
                               f"harness (or by zero-to-adapter)")
    return path


def _read_recipe(path: Path):
    from harness.recipe import RecipeError, read_saved_recipe

    try:
        recipe = read_saved_recipe(path)
    except RecipeError as error:
        raise ConvertError(str(error)) from None
    if recipe.adapter.name != "lora":
        raise ConvertError(f"{path}: adapter.name = {recipe.adapter.name!r}: a full fine-tune has no adapter; "
                           f"use DeepSpeed's zero_to_fp32 for its weights")
    return recipe


def _read_rope(directory: Path) -> dict:
    try:
        rope = json.loads((directory / ROPE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConvertError(f"{directory / ROPE}: unreadable: {_first_line(error)}") from None
    if not isinstance(rope, dict) or not {"rope_parameters", "max_position_embeddings"} <= rope.keys():
        raise ConvertError(f"{directory / ROPE}: needs rope_parameters and max_position_embeddings")
    return rope


def _base_config(recipe, base: str | None):
    """The base's config; the base is --base, else the recipe's model materialized as in training."""
    from transformers import AutoConfig

    from harness.base_model import BaseModelError, materialize

    cfg = recipe.model
    try:
        path = base or materialize(cfg.name_or_path, init_config=cfg.init_config, init_seed=cfg.init_seed,
                                   gguf_file=cfg.gguf_file)
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, BaseModelError) as error:
        where = "--base" if base else "the recipe's model.name_or_path"
        raise ConvertError(f"{where} {base or cfg.name_or_path}: cannot load it: {_first_line(error)}") from None
    config.name_or_path = path
    return config


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"{out}: already exists and is not empty; choose another OUT or pass --overwrite")


class _writing:
    """A temporary sibling of `out`, renamed into place only when the block succeeds."""

    def __init__(self, out: Path):
        from harness import checkpoint

        self.out, self.tmp = out, checkpoint.temporary_dir(out)

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, kind, error, traceback):
        from harness import checkpoint

        if kind is None:
            checkpoint.publish(self.tmp, self.out)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def _save_safetensors(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt"})  # the metadata PEFT writes


def _count_tensors(directory: Path) -> int:
    from safetensors import safe_open

    count = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            count += len(handle.keys())
    return count


def _dtypes(tensors) -> str:
    return ", ".join(sorted({_short_dtype(str(t.dtype).replace("torch.", "")) for t in tensors}))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------- command line

def print_report(report: Report, console) -> None:
    """Files written with their sizes, then what they hold: tensors, dtype, rope, provenance."""
    from rich.table import Table

    rope = report.rope["rope_parameters"]
    table = Table(title=f"Wrote {report.out}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for path in sorted(report.out.iterdir()):
        table.add_row(path.name, f"{path.stat().st_size / 2**20:.2f} MiB")
    table.add_section()
    table.add_row("tensors", f"{report.tensors} ({report.dtype})")
    table.add_row("rope", f"{rope.get('rope_type', 'default')} factor {rope.get('factor', 1.0)}, "
                          f"max_position_embeddings {report.rope['max_position_embeddings']}")
    for note in report.notes:
        key, _, value = note.partition(": ")
        table.add_row(key, value)
    if report.verification is not None:
        v = report.verification
        table.add_row("verified", f"max |diff| {v.max_abs_diff:.3g} <= tolerance {v.tolerance:.3g} "
                                  f"({v.tokens} tokens)")
    console.print(table)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise ConvertError(message)


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="convert.py", description="From checkpoint to usable model.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    zero = commands.add_parser("zero-to-adapter", help="ZeRO-2/3 checkpoint -> PEFT adapter directory")
    zero.add_argument("checkpoint", help="harness checkpoint dir, or a DeepSpeed folder with a latest file")
    zero.add_argument("out", help="adapter directory to write")
    zero.add_argument("--tag", help="DeepSpeed tag (default: the latest file)")
    zero.add_argument("--recipe", help="the run's recipe.toml when none lies beside the checkpoint")
    zero.add_argument("--base", help="base model (default: the recipe's model.name_or_path)")
    zero.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    merge_cmd = commands.add_parser("merge", help="adapter + base -> merged Hugging Face model (safetensors)")
    merge_cmd.add_argument("adapter", help="final/ or checkpoint directory, or zero-to-adapter output")
    merge_cmd.add_argument("out", help="model directory to write")
    merge_cmd.add_argument("--base", help="base model (default: the recipe's model.name_or_path)")
    merge_cmd.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="saved dtype")
    merge_cmd.add_argument("--base-weights", choices=("dequantized", "original"), default="dequantized",
                           help="merge into the NF4 round-tripped weights QLoRA trained against (default) "
                                "or into the original 16-bit weights")
    merge_cmd.add_argument("--verify", action="store_true",
                           help="compare merged logits with base + adapter; exit 1 on a mismatch")
    merge_cmd.add_argument("--tolerance", type=_nonnegative_float,
                           help=f"--verify tolerance relative to max |logit| (default {TOLERANCES})")
    merge_cmd.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    try:
        args = build_parser().parse_args(argv)
        _quiet_libraries()
        if args.command == "zero-to-adapter":
            report = zero_to_adapter(args.checkpoint, args.out, tag=args.tag, recipe_file=args.recipe,
                                     base=args.base, overwrite=args.overwrite)
        else:
            report = merge(args.adapter, args.out, base=args.base, dtype=args.dtype, base_weights=args.base_weights,
                           verify=args.verify, tolerance=args.tolerance, overwrite=args.overwrite)
    except ConvertError as error:
        print(f"convert.py: error: {error}", file=sys.stderr)
        return 2
    except VerifyError as error:
        print(f"convert.py: verification failed: {error}", file=sys.stderr)
        return 1
    print_report(report, Console())
    return 0


def _quiet_libraries() -> None:
    """Library warnings and progress bars off stderr, so that an error is the one line there.
    Environment variables: read when the libraries are imported, which happens later."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")  # DeepSpeed's and transformers' progress bars
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations between peft and transformers
