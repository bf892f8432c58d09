"""Cheap fingerprints of the data a run trains on and of the base it trains, so that a resumed run
notices changed data and an adapter notices a base with other weights.

    data_fingerprint("books/")            -> "3f9c0d1e2a4b5c6d"   ("" for hub data: its revision is the hub's)
    weights_fingerprint("models/llama")   -> the same over its weight files ("" for a hub id)

Each file named by the path (the file, every file under the folder, the glob's matches) adds its
name, its size and its first and last MiB: an edit, an append or a truncation changes it, and a
100 GB corpus costs 2 MiB of reading a file. The modification time is left out: copying the
same data to another disk does not change what is trained on.
"""
from __future__ import annotations

import glob
import hashlib
import logging
from pathlib import Path

MIB = 1 << 20


def data_files(path: str) -> list[Path]:
    given = Path(path).expanduser()
    if given.is_file():
        return [given]
    if given.is_dir():
        return sorted(p for p in given.rglob("*") if p.is_file())
    return sorted(Path(p) for p in glob.glob(str(given), recursive=True) if Path(p).is_file())


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def data_fingerprint(path: str) -> str:
    if not path or path.startswith("hub:"):
        return ""
    return files_fingerprint(data_files(path))


def weights_fingerprint(path: str) -> str:
    """Over the weight files of a local model directory (or a .gguf file); "" for anything else."""
    given = Path(path).expanduser()
    if not given.exists():
        return ""
    return files_fingerprint([f for f in data_files(path) if f.suffix in WEIGHT_SUFFIXES])


def files_fingerprint(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as f:
            digest.update(f.read(MIB))
            if size > MIB:
                f.seek(max(MIB, size - MIB))
                digest.update(f.read())
    return digest.hexdigest()[:16]


def warn_if_other_base(trained_on: str, base_path: str, adapter) -> str:
    """An adapter on a base of the same shape but other weights loads without error and computes
    something else: warned about (the "harness" logger) and returned; "" when the weights match or
    either fingerprint is unknown (a hub id)."""
    here = weights_fingerprint(base_path)
    if not (trained_on and here and here != trained_on):
        return ""
    warning = (f"{adapter} was trained on a base whose weight files differ from those of {base_path} (fingerprint "
               f"{trained_on}, here {here}): its outputs will be wrong unless this is the same model")
    logging.getLogger("harness").warning("%s", warning)
    return warning
