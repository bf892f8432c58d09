"""ZeRO state -> PEFT adapter directory, without a separate zero_to_fp32 step.

    report = zero_to_adapter("runs/x/checkpoint-500", "runs/x/adapter-500")

zero_to_adapter reads the fp32 master weights of a ZeRO-2/3 checkpoint in-process (DeepSpeed's
zero_to_fp32 functions), keeps the trainable tensors (LoRA A/B, the modules_to_save copies of
embeddings and norms) under PEFT's saved key names, and checks them against the LoRA the
recipe builds on an empty (meta) copy of the base: same key set, same shapes, no empty ZeRO-3
shard. The output is a directory `merge` (harness.merge) and the evaluation tools take.
"""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

from harness import registry, rundir
from harness.atomic import atomic_dir
from harness.conversion import ConvertError, Report, base_config, check_out, read_lora_recipe, short_dtype

PEFT_ROOT = "base_model.model."  # where a PeftModel's own parameter names start


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
    recipe = read_lora_recipe(sidecars)
    check_out(out, overwrite, [("CHECKPOINT", checkpoint), ("its DeepSpeed state", deepspeed_dir),
                               ("the recipe", sidecars / rundir.RECIPE_FILE), ("--base", base)])
    config = base_config(recipe, base)
    peft_model = _meta_peft_model(recipe, config, sidecars)
    weights = _zero_trainable_weights(deepspeed_dir, tag)
    state = adapter_state_dict(peft_model, weights, where=str(checkpoint))
    rope = rundir.read_rope(sidecars) if (sidecars / rundir.ROPE_FILE).is_file() else derive_rope(recipe, config)
    with atomic_dir(out) as tmp:
        _save_safetensors(state, tmp / rundir.ADAPTER_WEIGHTS)
        _write_adapter_config(peft_model, sidecars, tmp, config.name_or_path)
        shutil.copyfile(sidecars / rundir.RECIPE_FILE, tmp / rundir.RECIPE_FILE)
        rundir.write_rope(tmp, rope)
    dtypes = ", ".join(sorted({short_dtype(str(t.dtype)) for t in state.values()}))
    return Report(out, len(state), dtypes, rope, notes=[f"source: {deepspeed_dir / tag} (fp32 master weights)"])


def find_deepspeed_checkpoint(checkpoint: Path, tag: str | None = None) -> tuple[Path, str]:
    """(folder with `latest` and the tag folders, tag) for a harness checkpoint dir, a DeepSpeed
    save folder or a tag folder itself."""
    if not checkpoint.is_dir():
        raise ConvertError(f"{checkpoint}: no such checkpoint directory")
    found = None
    for folder in (checkpoint / rundir.DEEPSPEED_DIR, checkpoint):
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
            f"{checkpoint / rundir.DEEPSPEED_DIR} and {checkpoint}). A checkpoint of the accelerate engine already "
            f"holds {rundir.ADAPTER_WEIGHTS}: pass it to `merge` directly"
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
        if (folder / rundir.RECIPE_FILE).is_file():
            return folder
    raise ConvertError(f"{checkpoint}: no {rundir.RECIPE_FILE} beside the DeepSpeed checkpoint; pass the training "
                       f"recipe with --recipe")


def _zero_trainable_weights(deepspeed_dir: Path, tag: str) -> dict:
    """{name: fp32 tensor} of the parameters the optimizer held, gathered over all ZeRO ranks."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bar; a failure still raises
            return get_fp32_state_dict_from_zero_checkpoint(str(deepspeed_dir), tag=tag,
                                                            exclude_frozen_parameters=True)
    except (OSError, ValueError, KeyError) as error:
        raise ConvertError(f"{deepspeed_dir / tag}: DeepSpeed cannot read it: {error}") from None


def _meta_peft_model(recipe, config, sidecars: Path):
    """The recipe's LoRA on an empty (meta-device) base: every name and shape, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
        if (sidecars / rundir.ADAPTER_CONFIG).is_file():
            from peft import LoraConfig, get_peft_model

            peft_config = LoraConfig.from_pretrained(str(sidecars))
            peft_config.inference_mode = False  # saved as True; trainable = what the optimizer held
            from harness.quiet import peft_quietly

            with peft_quietly():
                return get_peft_model(model, peft_config)
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
    if (sidecars / rundir.ADAPTER_CONFIG).is_file():
        shutil.copyfile(sidecars / rundir.ADAPTER_CONFIG, out / rundir.ADAPTER_CONFIG)
        return
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = base_path
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    config.save_pretrained(str(out))


def derive_rope(recipe, config) -> dict:
    """rope_parameters.json contents the recipe's position backend gives this base config (edits it)."""
    from harness.backends.position import original_context_of

    original = original_context_of(config, recipe.model.original_context)
    try:
        backend = registry.get("position", recipe.position.name, key="position.name")
        backend.fn(config, **registry.table_kwargs(backend, recipe.position), original_context=original)
    except ValueError as error:  # BackendError, PositionError
        raise ConvertError(f"{recipe.source}: cannot rebuild the rope parameters: {error}") from None
    return rundir.rope_record(config, original)


def _save_safetensors(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt"})  # the metadata PEFT writes
