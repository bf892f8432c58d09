"""How often does a finished two-rank run exit nonzero? The tiny recipe launched N times per launcher path.

    python bench/launch_soak.py                                  # every path, 20 launches each
    python bench/launch_soak.py --paths deepspeed-sp --runs 50   # one path
    python bench/launch_soak.py --budget-min 60 --label before   # stop starting launches after an hour

Each launch trains recipes/tiny_cpu.toml for --steps steps on 2 CPU ranks (gloo, OMP_NUM_THREADS=1
per rank) to its exported adapter, then exits; the launcher's exit status is counted. Paths:

    accelerate-ddp           accelerate launch --multi_gpu --num_processes 2
    torchrun-ddp             torchrun --nproc_per_node 2
    accelerate-fsdp2         accelerate launch --config_file launch/accelerate/fsdp.yaml (FSDP2, NF4 sharded)
    deepspeed-zero2-offload  deepspeed --num_gpus 2, ZeRO-2 with DeepSpeed's CPU Adam
    deepspeed-zero3          deepspeed --num_gpus 2, ZeRO-3 (unquantized base)
    deepspeed-sp             deepspeed --num_gpus 2, Ulysses sequence parallelism over both ranks, ZeRO-2 +
                             CPU Adam, full attention (the launch of issue 34's failing test)

Launches go round-robin over the paths, so a run cut short by --budget-min leaves the counts even.
A launch counts as failed when the launcher exits nonzero, when it runs past --timeout-s (status
"timeout"), or when it exits 0 without its final/ adapter (status "no adapter"). A C++ abort of a
rank ("terminate called ...") is flagged in its row whatever the exit status. The logs of failed
launches are kept under --logs.

Results: bench/results/launch_soak[_LABEL].json (the machine, lscpu model and flags, every launch)
and a table on stdout.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS_DIR, machine, shown, write_results  # noqa: E402

VENV_BIN = Path(sys.executable).parent
COMMON = ["adapter.dropout=0.0", "data.max_seq_length=256", "train.grad_accum=1"]
DEEPSPEED = ['engine.name="deepspeed"']


def paths() -> dict[str, tuple[list[str], list[str]]]:
    """name -> (launcher command before the script, recipe overrides)."""
    accelerate = [str(VENV_BIN / "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no"]
    deepspeed = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2"]
    return {
        "accelerate-ddp": ([*accelerate, "--multi_gpu", "--num_processes", "2"], []),
        "torchrun-ddp": ([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2"], []),
        "accelerate-fsdp2": ([str(VENV_BIN / "accelerate"), "launch", "--config_file", "launch/accelerate/fsdp.yaml",
                              "--num_processes", "2"], []),
        "deepspeed-zero2-offload": (deepspeed, [*DEEPSPEED,
                                                'engine.deepspeed_config="launch/deepspeed/zero2_offload.json"']),
        "deepspeed-zero3": (deepspeed, [*DEEPSPEED, 'engine.deepspeed_config="launch/deepspeed/zero3.json"',
                                        'quantization.name="none"']),
        "deepspeed-sp": (deepspeed, [*DEEPSPEED, 'engine.deepspeed_config="launch/deepspeed/zero2_offload.json"',
                                     "engine.sequence_parallel_size=2", 'attention.name="full"']),
    }


PORT_OPTION = {"accelerate": "--main_process_port", "torchrun": "--master_port", "deepspeed": "--master_port"}


def free_port() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def launch(name: str, output_dir: Path, *, steps: int, cache: Path, timeout_s: float) -> dict:
    """One launch of path `name`: its exit status, wall time, and the tail of its log."""
    launcher, overrides = paths()[name]
    port = [PORT_OPTION[Path(launcher[0]).name], free_port()]
    command = [*launcher, *port, "launch/train.py", "recipes/tiny_cpu.toml", f'train.output_dir="{output_dir}"',
               f"train.max_steps={steps}", f"train.save_every={steps}", *COMMON, *overrides]
    env = {**os.environ, "HARNESS_CACHE": str(cache), "OMP_NUM_THREADS": "1", "COLUMNS": "200",
           "PATH": os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # this tree's
    # harness, also where ROOT is a copy of the repository (an editable install points at the original)
    env.pop("WORLD_SIZE", None)
    started = time.monotonic()
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          start_new_session=True) as process:
        try:
            log, _ = process.communicate(timeout=timeout_s)
            code, status = process.returncode, ""
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the launcher and both ranks
            log, _ = process.communicate()
            code, status = None, "timeout"
    wall = time.monotonic() - started
    if not status:
        status = "ok" if code == 0 else f"exit {code}"
    if status == "ok" and not (output_dir / "final" / "adapter_model.safetensors").is_file():
        status = "no adapter"
    aborted = "terminate called" in log
    return {"path": name, "exit_code": code, "status": status, "aborted": aborted, "wall_s": round(wall, 1),
            "log": log}


def soak(names: list[str], *, runs: int, steps: int, budget_s: float, timeout_s: float, logs: Path) -> list[dict]:
    rows: list[dict] = []
    deadline = time.monotonic() + budget_s
    with tempfile.TemporaryDirectory(prefix="launch-soak-") as scratch:
        cache = Path(os.environ.get("HARNESS_CACHE") or Path(scratch) / "cache")
        for index, name in itertools.product(range(runs), names):
            if time.monotonic() > deadline:
                print(f"budget spent: stopped before launch {index + 1} of {name}", file=sys.stderr)
                break
            output_dir = Path(scratch) / f"{name}-{index}"
            row = launch(name, output_dir, steps=steps, cache=cache, timeout_s=timeout_s)
            row["index"] = index
            log = row.pop("log")
            if row["status"] != "ok" or row["aborted"]:
                logs.mkdir(parents=True, exist_ok=True)
                kept = logs / f"{name}-{index}.log"
                kept.write_text(log)
                row["log_file"] = shown(kept)
                row["tail"] = [line for line in log.splitlines() if line.strip()][-6:]
            core = ROOT / "core"  # kernel.core_pattern = core, where the shell allowed dumps (ulimit -c)
            if core.is_file():
                logs.mkdir(parents=True, exist_ok=True)
                shutil.move(core, logs / f"{name}-{index}.core")
                row["core_file"] = str(logs / f"{name}-{index}.core")
            shutil.rmtree(output_dir, ignore_errors=True)
            rows.append(row)
            print(f"{name:24} #{index:<3} {row['status']:10} "
                  f"{'ABORT ' if row['aborted'] else ''}{row['wall_s']:6.1f} s", flush=True)
    return rows


def summary(rows: list[dict], names: list[str]) -> list[dict]:
    table = []
    for name in names:
        mine = [row for row in rows if row["path"] == name]
        if not mine:
            continue
        failed = [row for row in mine if row["status"] != "ok"]
        codes = collections.Counter(row["status"] for row in failed)
        table.append({"path": name, "launches": len(mine), "nonzero": len(failed),
                      "aborts": sum(row["aborted"] for row in mine),
                      "codes": dict(codes), "median_wall_s": round(statistics.median(r["wall_s"] for r in mine), 1)})
    return table


def print_table(table: list[dict]) -> None:
    print(f"\n{'path':24} {'launches':>8} {'nonzero':>8} {'aborts':>7} {'median s':>9}  codes")
    for row in table:
        codes = ", ".join(f"{code}: {count}" for code, count in row["codes"].items()) or "-"
        print(f"{row['path']:24} {row['launches']:8} {row['nonzero']:8} {row['aborts']:7} {row['median_wall_s']:9}  "
              f"{codes}")
    total = sum(row["launches"] for row in table)
    print(f"{'all':24} {total:8} {sum(row['nonzero'] for row in table):8} {sum(row['aborts'] for row in table):7}")


def main(argv=None) -> None:
    names = list(paths())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", nargs="+", choices=names, default=names)
    parser.add_argument("--runs", type=int, default=20, help="launches per path")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per launch")
    parser.add_argument("--budget-min", type=float, default=600.0, help="start no launch after this many minutes")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="a launch running longer is killed")
    parser.add_argument("--label", default="", help="results file bench/results/launch_soak_LABEL.json")
    parser.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "launch_soak_logs")
    args = parser.parse_args(argv)
    output = RESULTS_DIR / (f"launch_soak_{args.label}.json" if args.label else "launch_soak.json")
    record = machine()
    print(f"{record['cpu_model']}, {record['cpu_count']} CPUs; {args.runs} launches x {len(args.paths)} paths",
          flush=True)
    started = time.monotonic()
    rows = soak(args.paths, runs=args.runs, steps=args.steps, budget_s=args.budget_min * 60,
                timeout_s=args.timeout_s, logs=args.logs)
    table = summary(rows, args.paths)
    print_table(table)
    config = {"paths": args.paths, "runs": args.runs, "steps": args.steps, "budget_min": args.budget_min,
              "timeout_s": args.timeout_s, "wall_s": round(time.monotonic() - started, 1),
              "commands": {name: " ".join([*paths()[name][0], "launch/train.py recipes/tiny_cpu.toml",
                                           *COMMON, *paths()[name][1]]) for name in args.paths}}
    write_results(output, {**record, "load_average_after": os.getloadavg()}, {**config, "summary": table}, rows)


if __name__ == "__main__":
    main()
