"""Adapter + base -> merged Hugging Face model, and the check that it computes what training did.

    report = merge("runs/x/final", "runs/x/merged", dtype="bf16", verify=True)
    verification = verify_merged("runs/x/merged", "runs/x/final")

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
resolved.weights_dtype, recorded in the saved recipe; a recipe saved before it was recorded
gets harness.policy's rule for model.dtype on this machine (fp32 on the CPU; for "auto" the
compute dtype on a GPU).

A failed verification raises VerifyError (tools/convert.py exits 1); bad input ConvertError.
"""
from __future__ import annotations

import json
from pathlib import Path

from harness import policy, rundir
from harness.atomic import atomic_dir
from harness.conversion import ConvertError, Report, Verification, base_config, check_out, read_lora_recipe, short_dtype
from harness.errors import HarnessError, first_line
from harness.fingerprint import warn_if_other_base
from harness.recipe import Recipe

NF4_BLOCKSIZE = 64  # bitsandbytes' Linear4bit default, which transformers' loader uses
# Default --verify tolerance: the largest |merged - reference| logit allowed, as a share of
# the reference's largest |logit|. fp32 only sees summation-order rounding; 16-bit merged
# weights add one rounding of every weight (bf16 keeps 8 mantissa bits, fp16 11).
TOLERANCES = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}
VERIFY_TOKENS = 128  # sampled token ids in the verification forward pass


class VerifyError(HarnessError):
    """The merged model's logits differ from base + adapter by more than the tolerance."""

    exit_code = 1  # the input was fine, the result is not
    headline = "verification failed"  # what harness.cli.args.run prints instead of "error"


def merge(adapter: str | Path, out: str | Path, *, base: str | None = None, dtype: str = "bf16",
          base_weights: str = "dequantized", verify: bool = False, tolerance: float | None = None,
          overwrite: bool = False) -> Report:
    """Adapter (+ modules_to_save) merged into a 16-bit base -> HF model + tokenizer in `out`.

    With `verify`, the written model is checked (verify_merged) before `out` is put in place;
    a mismatch raises VerifyError and leaves no `out`.
    """
    adapter, out = adapter_dir(Path(adapter)), Path(out)
    recipe = read_lora_recipe(adapter)
    rope = rundir.read_rope(adapter)
    check_out(out, overwrite, [("ADAPTER", adapter), ("--base", base),
                               ("the base its recipe names", None if base else recipe.model.name_or_path)])
    from harness.backends.quantization import TORCH_DTYPES  # torch: only once the input is checked

    model, base_path, regime = load_base(recipe, rope, base=base, base_weights=base_weights)
    merged = rundir.attach_adapter(model, adapter).merge_and_unload()  # fp32 W + B A * alpha/r, wrappers removed
    other_base = warn_if_other_base(recipe.resolved.base_fingerprint, base_path, adapter)  # --verify cannot see it
    merged.to(TORCH_DTYPES[dtype])
    verification = None
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        _tokenizer(recipe, base_path).save_pretrained(str(tmp))
        tensors = _count_tensors(tmp)
        del model, merged
        if verify:
            verification = verify_merged(tmp, adapter, base=base, base_weights=base_weights, tolerance=tolerance)
    notes = [f"base: {base_path}", f"base weights: {regime}"] + ([f"warning: {other_base}"] if other_base else [])
    return Report(out, tensors, dtype, rope, notes=notes,
                  verification=verification)


def adapter_dir(path: Path) -> Path:
    """`path`, checked to hold what merging needs: the adapter files, the recipe and the rope."""
    if not path.is_dir():
        raise ConvertError(f"{path}: no such adapter or checkpoint directory")
    if not (path / rundir.ADAPTER_WEIGHTS).is_file() and (path / rundir.DEEPSPEED_DIR).is_dir():
        raise ConvertError(f"{path}: holds DeepSpeed state but no {rundir.ADAPTER_WEIGHTS}; run "
                           f"`tools/convert.py zero-to-adapter {path} OUT` first and merge OUT")
    for name in rundir.MODEL_FILES:
        if not (path / name).is_file():
            raise ConvertError(f"{path}: {name} is missing; pass a checkpoint or final/ directory written by the "
                               f"harness (or by zero-to-adapter)")
    return path


def load_base(recipe: Recipe, rope: dict, *, base: str | None = None, base_weights: str = "dequantized"):
    """(fp32 model with the extended rope, base path, regime in words), weights as `base_weights` says."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.backends.quantization import TORCH_DTYPES

    config = base_config(recipe, base)
    config.rope_parameters = rope["rope_parameters"]
    config.max_position_embeddings = rope["max_position_embeddings"]
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a 16-bit merge of a pre-quantized base must not claim quantization
    nf4, regime = weights_regime(recipe, base_weights)
    try:
        model = AutoModelForCausalLM.from_pretrained(config.name_or_path, config=config, dtype=torch.float32,
                                                     trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConvertError(f"base model {config.name_or_path}: cannot load its weights: "
                           f"{first_line(error)}") from None
    if nf4:
        trained_as = TORCH_DTYPES[trained_weights_dtype(recipe)]
        for module in quantized_linears(model):
            module.weight.data = nf4_round_trip(module.weight.data, double_quant=recipe.quantization.double_quant,
                                                dtype=trained_as)
    return model.eval(), config.name_or_path, regime


def trained_weights_dtype(recipe: Recipe) -> str:
    """The dtype the frozen weights were loaded in for training, which NF4 quantized from."""
    return recipe.resolved.weights_dtype or policy.frozen_weights_dtype(
        recipe.model.dtype, recipe.quantization.compute_dtype, policy.Device.current())


def weights_regime(recipe: Recipe, base_weights: str) -> tuple[bool, str]:
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


def _tokenizer(recipe: Recipe, base_path: str):
    from harness.tokenizer import load_tokenizer

    name = recipe.model.tokenizer or base_path
    try:
        return load_tokenizer(name)
    except (OSError, ValueError) as error:
        raise ConvertError(f"tokenizer {name}: cannot load it: {first_line(error)}") from None


def _count_tensors(directory: Path) -> int:
    from safetensors import safe_open

    count = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            count += len(handle.keys())
    return count


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

    merged, adapter = Path(merged), adapter_dir(Path(adapter))
    model, _, _ = load_base(read_lora_recipe(adapter), rundir.read_rope(adapter), base=base,
                            base_weights=base_weights)
    reference = rundir.attach_adapter(model, adapter).eval()
    ids = _sample_ids(reference.config.vocab_size, min(VERIFY_TOKENS, reference.config.max_position_embeddings))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits  # (1, tokens, vocab), fp32
        del reference, model
        try:
            candidate_model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
        except (OSError, ValueError) as error:
            raise ConvertError(f"{merged}: cannot load the merged model: {first_line(error)}") from None
        candidate = candidate_model(input_ids=ids).logits
    saved_dtype = json.loads((merged / "config.json").read_text(encoding="utf-8")).get("dtype", "float32")
    relative = tolerance if tolerance is not None else TOLERANCES[short_dtype(saved_dtype)]
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
