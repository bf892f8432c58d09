"""Helpers shared by the benchmarks under bench/.

    record = machine()                      # where the numbers came from
    weights = random_llama2_dir("llama2-7b")  # bf16 random weights of a published LLaMA2 shape
    result = run_child(command, env=..., budget_bytes=..., timeout_s=...)
    write_results(path, record, config, rows)

Every measurement runs in its own subprocess so that one configuration's allocations,
glibc heap and peak RSS never leak into the next. A child prints one JSON line last; the
parent turns a crash, a kill or a timeout into a status instead of a number.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness.memory import LLAMA2_SHAPES as PUBLISHED_LLAMA2_SHAPES

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
SMOLLM2 = "recipes/smollm2_135m_16k.toml"
SMOLLM2_TARGET = 16384  # its position.target_length: longer sequences need a longer target (harness.recipe_checks)
GB = 1e9  # memory is reported in GB (10^9 bytes), as the table states it
POLL_S = 0.2  # how often the parent samples a child's RSS against the budget
LLAMA2_SHAPES = {  # name -> config.json shape keys: the published LLaMA2 configs (harness.memory's) ...
    **PUBLISHED_LLAMA2_SHAPES,
    # ... and a LLaMA2-like tiny one, for smoke runs of the GPU benchmarks on a CPU
    "llama-tiny": {"vocab_size": 32000, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False},
}
LLAMA2_CONTEXT = 4096
LOAD_WARNING = 1.5  # 1-minute load average above which timings are shared with other jobs


# --------------------------------------------------------------------------- machine record

def machine() -> dict:
    """Platform, CPU, RAM, library versions and the device the numbers came from."""
    import bitsandbytes
    import peft
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "ram_bytes": _total_ram(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()})",
        "load_average": os.getloadavg(),  # other processes may share the CPU
        **cpu_record(),
    }


def cpu_record() -> dict:
    """lscpu's model name and flags: which instructions (AVX-512, AVX512-BF16) the numbers ran on."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        return {"cpu_model": platform.processor() or platform.machine(), "cpu_flags": []}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {"cpu_model": fields.get("Model name", "").strip(), "cpu_flags": fields.get("Flags", "").split()}


def load_average() -> float:
    return os.getloadavg()[0]


def warn_load(when: str) -> float:
    """The 1-minute load average, with a warning on stderr above LOAD_WARNING."""
    value = load_average()
    if value > LOAD_WARNING:
        print(f"warning: load average {value:.2f} {when} (> {LOAD_WARNING}): other jobs share the CPU, "
              f"timings are slower than the machine is", file=sys.stderr)
    return value


def _total_ram() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------- LLaMA2-shaped models

def llama2_config(name: str) -> dict:
    return {**LLAMA2_SHAPES[name], "max_position_embeddings": LLAMA2_CONTEXT, "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def llama2_overrides(weights: Path, target_length: int) -> tuple[str, ...]:
    """Recipe overrides that swap SmolLM2 for a LLaMA2-shaped checkpoint, PI 4k -> target_length
    (no extension where target_length is within the 4k window: llama-tiny's smoke runs at a few
    hundred tokens)."""
    return (f'model.name_or_path="{weights}"', 'model.tokenizer="builtin:bytes"',
            f"model.original_context={LLAMA2_CONTEXT}", f"position.target_length={max(target_length, LLAMA2_CONTEXT)}")


def random_llama2_dir(name: str) -> Path:
    """A bf16 checkpoint of random weights in LLaMA2 shape `name`, written once under the harness cache.

    Random weights take the memory and time of real ones. They are drawn on the GPU where there
    is one (a 13B model in seconds; the harness's own "random" models are fp32 and drawn on the
    CPU, which takes minutes and twice the disk at this size)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.base_model import _atomic_build, cache_root

    def build(tmp: Path) -> None:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # drawn in bf16: half the memory of fp32 then a cast
        try:
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = LlamaForCausalLM(LlamaConfig(**llama2_config(name), dtype="bfloat16"))
        finally:
            torch.set_default_dtype(default_dtype)
        model.save_pretrained(tmp)
        del model
        torch.cuda.empty_cache()  # a no-op without CUDA

    return _atomic_build(cache_root() / "random-bf16" / name, build)


# --------------------------------------------------------------------------- inside a child

def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Linux >= 4.0), so that a later peak excludes model loading."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """VmHWM: the peak resident set since the process started or since reset_peak_rss()."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def emit(result: dict) -> None:
    """The child's answer: one JSON line, the last on stdout."""
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the parent side

def child_env(*, glibc_defaults: bool) -> dict:
    """The environment of a child; glibc_defaults drops any MALLOC_* tuning inherited from the shell."""
    env = {**os.environ, "HARNESS_CACHE": os.environ.get("HARNESS_CACHE", str(Path.home() / ".cache" / "harness"))}
    if glibc_defaults:
        env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    return env


def run_child(command: list[str], *, env: dict, budget_bytes: float, timeout_s: float) -> dict:
    """Run `command`; its last stdout line (JSON), or {"status": ...} when it did not finish.

    The RSS of the child is sampled every POLL_S seconds: above `budget_bytes` it is killed
    ("over budget"), so that a run cannot take the memory other processes on the machine need.
    A child killed by the kernel (SIGKILL) or raising MemoryError counts as "OOM".
    """
    started = time.monotonic()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=ROOT, start_new_session=True) as process:
        status = _watch(process, budget_bytes, started + timeout_s)
        if status:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the child and anything it started
        stdout, stderr = process.communicate()
    seconds = time.monotonic() - started
    if status:
        return {"status": status, "wall_s": seconds}
    if process.returncode:
        return {"status": _failure(process.returncode, stderr), "wall_s": seconds,
                "stderr_tail": stderr.strip().splitlines()[-5:]}
    return {**json.loads(stdout.strip().splitlines()[-1]), "wall_s": seconds}


def _watch(process: subprocess.Popen, budget_bytes: float, deadline: float) -> str:
    """"" once the child exits by itself, else why it has to be stopped."""
    while process.poll() is None:
        if time.monotonic() > deadline:
            return "timeout"
        if _rss_of(process.pid) > budget_bytes:
            return "over budget"
        time.sleep(POLL_S)
    return ""


def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0  # gone between poll() and the read


def _failure(returncode: int, stderr: str) -> str:
    if returncode == -signal.SIGKILL or "MemoryError" in stderr or "OutOfMemoryError" in stderr:
        return "OOM"
    lines = stderr.strip().splitlines()
    return f"error: {lines[-1] if lines else f'exit {returncode}'}"


# --------------------------------------------------------------------------- output

def write_results(path: Path, record: dict, config: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": record, "config": config, "rows": rows}, indent=2) + "\n")
    print(f"wrote {shown(path)}")


def shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def gb(size: float) -> str:
    return f"{size / GB:.2f}"


def length_label(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)
