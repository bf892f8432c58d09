"""Smoke runs of every bench/*.py script at its smallest settings, so that a changed signature in the
harness fails here and not on a GPU machine.

Each script runs through its own main(argv) in this process, on a tiny model (bench.common's
llama-tiny: a 2-layer LLaMA2 shape; or recipes/tiny_cpu.toml) for a step or two. The child processes
the scripts start (`python bench/X.py --child ...`, `launch/train.py`, `tools/eval_ppl.py`) run in
this process too, through the same main(argv) (run_here): the command lines the parents build are
parsed by the children's own parsers, without paying the interpreter's and torch's start each time.
Results go to tmp_path; bench/results/ is checked to stay untouched.

What cannot run in seconds is tested through its parts, a real run marked slow (--runslow) where
one is worth it: bench/launch_soak.py (its bookkeeping with made-up launches; slow: one real 2-rank
launch, ~30 s), the sp part of bench/sequence_parallel.py (slow: 1 and 2 DeepSpeed ranks, ~90 s; its
plan part runs over a few of its cells), bench/s2_transfer.py (needs the testbed grid's finished runs:
its probe is tested on a tiny model). bench/testbed.py's bookkeeping and shortened grid are
tests/test_testbed.py's and bench/gpu_carry.py is tests/test_gpu_carry.py's; here only testbed.py's
reporting (main past a made-up grid). bench/gpu_checks.sh runs these scripts' GPU commands;
`bash bench/gpu_checks.sh --rehearse` runs them end to end on the CPU (minutes: not a test).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
HARNESS_SCRIPTS = {"launch/train.py": "harness.cli.train", "tools/eval_ppl.py": "harness.cli.eval_ppl"}
WRITTEN = ("attention", "eval_cost", "memory", "plan_validation", "reproduce", "sequence_parallel", "testbed",
           "train_step")  # bench/results/ files the scripts here would write by default
RESULTS_DIR_USERS = ("bench.common", "bench.eval_cost", "bench.launch_soak", "bench.memory", "bench.memory_gpu",
                     "bench.reproduce", "bench.s2_transfer", "bench.sequence_parallel", "bench.testbed",
                     "bench.train_step")


@pytest.fixture(autouse=True)
def bench_here(session_cache, tmp_path, monkeypatch):
    """The shared model cache, cwd = the repository; every bench module's RESULTS_DIR under tmp_path,
    and bench/results/ left as it was."""
    (tmp_path / "results").mkdir()
    for name in RESULTS_DIR_USERS:
        monkeypatch.setattr(importlib.import_module(name), "RESULTS_DIR", tmp_path / "results")
    before = _listing(RESULTS)
    yield
    changed = sorted({name for name, _ in _listing(RESULTS).items() ^ before.items()})
    assert not changed, f"a smoke run wrote into bench/results/: {changed}"


def _listing(folder: Path) -> dict:
    """name -> mtime of what the scripts here write by default (other runs may share the checkout)."""
    return {path.name: path.stat().st_mtime_ns for path in folder.glob("*")
            if path.name.startswith(WRITTEN) or "smoke" in path.name} if folder.is_dir() else {}


def run_here(command: list[str]) -> str:
    """`python SCRIPT ARGS...` run in this process through the script's main(argv); its stdout."""
    assert command[0] == sys.executable, command
    script = Path(command[1])
    script = script.relative_to(ROOT) if script.is_absolute() else script
    module = importlib.import_module(HARNESS_SCRIPTS.get(script.as_posix()) or f"bench.{script.stem}")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = module.main(command[2:])
    assert not code, f"{' '.join(command[1:])} exited {code}"
    return stdout.getvalue()


def run_child_here(command: list[str], **_) -> dict:
    """bench.common.run_child, in this process (no budget, no timeout: a failure raises)."""
    started = time.monotonic()
    last = run_here(command).strip().splitlines()[-1]
    return {**json.loads(last), "wall_s": time.monotonic() - started}


def subprocess_here(command: list[str], **_) -> subprocess.CompletedProcess:
    """subprocess.run, for a script's children, in this process."""
    return subprocess.CompletedProcess(command, 0, stdout=run_here(command), stderr="")


def children_here(monkeypatch, module) -> None:
    """The children `module` starts (through run_child or subprocess.run) run in this process."""
    import bench.common

    if getattr(module, "run_child", None) is bench.common.run_child:  # not plan_validation's own run_child
        monkeypatch.setattr(module, "run_child", run_child_here)
    if hasattr(module, "subprocess"):
        monkeypatch.setattr(module, "subprocess", SimpleNamespace(run=subprocess_here))


def written(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


def finite_loss(value: float) -> bool:
    return math.isfinite(value) and 0 < value < 20  # random weights: about ln(vocab)


# --------------------------------------------------------------------------- bench/common.py

def test_common_run_child_turns_each_ending_into_a_status():
    from bench.common import child_env, run_child

    env = child_env(glibc_defaults=True)
    done = run_child([sys.executable, "-c", "print('noise'); print('{\"x\": 1}')"], env=env, budget_bytes=1e10,
                     timeout_s=60)
    assert done["x"] == 1 and done["wall_s"] > 0
    failed = run_child([sys.executable, "-c", "raise SystemExit('boom')"], env=env, budget_bytes=1e10, timeout_s=60)
    assert failed["status"] == "error: boom"
    slow = run_child([sys.executable, "-c", "import time; time.sleep(30)"], env=env, budget_bytes=1e10, timeout_s=0.5)
    assert slow["status"] == "timeout"
    big = run_child([sys.executable, "-c", "import time; time.sleep(30)"], env=env, budget_bytes=1, timeout_s=30)
    assert big["status"] == "over budget"


def test_common_llama2_overrides_extend_only_past_the_window():
    from bench.common import LLAMA2_CONTEXT, length_label, llama2_overrides

    assert f"position.target_length={LLAMA2_CONTEXT}" in llama2_overrides(Path("w"), 512)
    assert "position.target_length=32768" in llama2_overrides(Path("w"), 32768)
    assert (length_label(16384), length_label(1000)) == ("16k", "1000")


# --------------------------------------------------------------------------- bench/attention.py

def test_attention(tmp_path, monkeypatch):
    import bench.attention as bench

    children_here(monkeypatch, bench)
    bench.main(["--lengths", "256", "--repeats", "1", "--warmup", "0", "--output", str(tmp_path / "attention.json")])
    rows = written(tmp_path / "attention.json")["rows"]
    assert [row["method"] for row in rows] == list(bench.METHODS)
    for row in rows:
        assert row["length"] == 256 and row["seconds"] > 0 and row["peak_bytes"] >= 0, row
    assert next(row for row in rows if row["method"] == "full")["time_vs_full"] == 1.0


# --------------------------------------------------------------------------- bench/eval_cost.py

def test_eval_cost(tmp_path, monkeypatch):
    import bench.eval_cost as bench

    children_here(monkeypatch, bench)
    bench.main(["--recipe", "recipes/tiny_cpu.toml", "--steps", "2", "--output", str(tmp_path / "eval_cost.json")])
    result = written(tmp_path / "eval_cost.json")
    measured, planned = result["testbed"], result["llama2_13b_12k"]
    assert measured["steps"] == 2 and measured["train_s"] > 0
    assert measured["evaluations"] >= 1 and measured["eval_s"] > 0  # the watch evaluates at the last step
    assert planned["every"] >= 1 and planned["evaluations"] >= 1


# --------------------------------------------------------------------------- bench/launch_soak.py

def test_launch_soak_launchers_exist_and_the_counts_add_up(tmp_path, monkeypatch):
    import bench.launch_soak as bench

    for name, (launcher, _) in bench.paths().items():
        assert Path(launcher[0]).is_file(), f"{name}: no {launcher[0]}"
    outcomes = iter(["ok", "exit 250", "ok", "timeout"])

    def launch(name, output_dir, **_):
        status = next(outcomes)
        return {"path": name, "exit_code": 0 if status == "ok" else 250, "status": status, "aborted": False,
                "wall_s": 1.0, "log": "terminate called" if status != "ok" else ""}

    monkeypatch.setattr(bench, "launch", launch)
    bench.main(["--paths", "torchrun-ddp", "deepspeed-sp", "--runs", "2", "--label", "smoke", "--logs",
                str(tmp_path / "logs")])
    result = written(tmp_path / "results" / "launch_soak_smoke.json")
    summary = {row["path"]: row for row in result["config"]["summary"]}
    assert summary["torchrun-ddp"]["nonzero"] == 0 and summary["deepspeed-sp"]["nonzero"] == 2
    assert summary["deepspeed-sp"]["codes"] == {"exit 250": 1, "timeout": 1}
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["deepspeed-sp-0.log", "deepspeed-sp-1.log"]


@pytest.mark.slow
def test_launch_soak_one_real_launch(tmp_path):
    """One 2-rank torchrun launch of the tiny recipe, one step, to its adapter (a minute)."""
    import bench.launch_soak as bench

    bench.main(["--paths", "torchrun-ddp", "--runs", "1", "--steps", "1", "--label", "smoke",
                "--logs", str(tmp_path / "logs")])
    rows = written(tmp_path / "results" / "launch_soak_smoke.json")["rows"]
    assert [row["status"] for row in rows] == ["ok"]


# --------------------------------------------------------------------------- bench/memory.py

def test_memory(tmp_path, monkeypatch):
    import bench.memory as bench

    children_here(monkeypatch, bench)
    output = tmp_path / "memory.json"
    bench.main(["--model", "llama-tiny", "--configs=longqlora,-s2", "--lengths", "256", "--output", str(output)])
    result = written(output)
    assert [(row["config"], row["status"]) for row in result["rows"]] == [("longqlora", "ok"), ("-s2", "ok")]
    for row in result["rows"]:
        assert row["peak_bytes"] >= row["before_bytes"] > 0 and finite_loss(row["loss"]), row
        assert row["plan_dynamic_bytes"] > 0, row.get("plan_error")
    assert result["config"]["model"] == "llama-tiny" and output.with_suffix(".png").is_file()


def test_memory_step_is_the_loops_less_the_optimizer_step():
    """bench.memory.forward_backward: the loop's forward and backward (gradients), no AdamW step."""
    from bench.memory import forward_backward
    from bench.train_step import build, model_overrides
    from harness.loop_memory import random_batch

    _, loop, model = build([*model_overrides("llama-tiny", 256), "data.max_seq_length=256"])
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    batch = random_batch(model.config.vocab_size, 1, 256, torch.Generator().manual_seed(0))
    assert finite_loss(forward_backward(loop, batch))
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.values())
    assert all(torch.equal(p, before[name]) for name, p in trained.items())  # no optimizer step
    assert not loop.engine.optimizer.state and "step" not in vars(loop.engine)  # the engine's own step is back


# --------------------------------------------------------------------------- bench/memory_gpu.py

def test_memory_gpu_on_the_cpu(tmp_path, monkeypatch):
    import bench.memory_gpu as bench

    children_here(monkeypatch, bench)
    output = tmp_path / "memory_gpu.json"
    bench.main(["--allow-cpu", "--lengths", "256", "--steps", "1", "--output", str(output)])
    result = written(output)
    [row] = result["rows"]
    assert (row["model"], row["length"], row["status"]) == ("llama-tiny", 256, "ok")
    assert row["tokens_per_s"] > 0 and row["peak_bytes"] > 0 and all(finite_loss(x) for x in row["losses"])
    assert row["plan_bytes"] > 0, row.get("plan_error")  # the planner's GPU prediction ran
    assert "plan_error_pct" not in row and "RSS" in result["config"]["memory"]


def test_memory_gpu_refuses_a_cpu_without_allow_cpu(tmp_path, capsys):
    import bench.memory_gpu as bench

    if torch.cuda.is_available():
        pytest.skip("a GPU is there")
    with pytest.raises(SystemExit):
        bench.main(["--output", str(tmp_path / "memory_gpu.json")])
    assert "this is a GPU benchmark" in capsys.readouterr().err


# --------------------------------------------------------------------------- bench/plan_validation.py

def test_plan_validation(tmp_path, monkeypatch):
    import bench.plan_validation as bench

    children_here(monkeypatch, bench)
    output = tmp_path / "plan_validation.json"
    bench.main(["--only", "tiny s2-sdpa L=512", "--output", str(output)])
    [row] = written(output)["rows"]
    assert row["config"] == "tiny s2-sdpa L=512" and "error" not in row, row.get("error")
    assert row["allocator_bytes"] > 0 and row["predicted_bytes"] > 0
    assert isinstance(row["rss_bytes"], int)  # in this process, without the child's malloc settings: a number only
    assert math.isfinite(row["error_pct"]) and row["static_bytes"] > 0


# --------------------------------------------------------------------------- bench/reproduce.py

def test_reproduce_on_a_tiny_model(tmp_path, monkeypatch):
    import bench.reproduce as bench

    children_here(monkeypatch, bench)
    bench.main(["--model", "llama-tiny", "--rows", "longqlora", "--steps", "1", "--grad-accum", "1",
                "--train-len", "256", "--seq-lens", "256", "--eval-tokens", "513", "--output", str(tmp_path / "runs"),
                "--results-dir", str(tmp_path / "out"), "--results", "smoke"])
    rows = written(tmp_path / "out" / "smoke.json")["rows"]
    assert [row["name"] for row in rows] == ["base", "pi", "longqlora"]
    assert all(math.isfinite(row["ppl"]["256"]) for row in rows)
    assert rows[2]["tokens_per_s"] > 0 and (tmp_path / "runs" / "longqlora" / "final").is_dir()
    assert (tmp_path / "out" / "smoke.png").is_file()


def test_reproduce_refuses_an_unknown_row(capsys):
    import bench.reproduce as bench

    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "longqlora,nope"])
    assert "--rows: unknown nope" in capsys.readouterr().err


def test_reproduce_pose_row_is_a_short_window_of_the_target(tmp_path, capsys):
    """gpu_checks.sh's PoSE check (--factor 4 --rows pose): SmolLM2 8k -> 32k in an 8k window, which the
    recipe checks accept; the default stays 8k -> 16k trained at the target; a window at the target is refused."""
    import bench.reproduce as bench
    from harness.recipe import load_recipe

    args = bench.parse_args(["--factor", "4", "--zero-shot", "yarn", "--rows", "pose", "--train-len", "8192",
                             "--output", str(tmp_path / "runs")])
    assert (args.target, args.zero_shot, args.rows) == (32768, ["yarn"], ["pose"])
    recipe = load_recipe(ROOT / bench.SMOLLM2, bench.train_overrides("pose", args, bench.train_split(tmp_path / "b")))
    assert (recipe.layout.name, recipe.attention.name, recipe.position.target_length) == ("pose", "full", 32768)
    assert (recipe.resolved.rope_factor, recipe.resolved.seq_len, recipe.resolved.sample_length) == (4.0, 8192, 32768)
    default = bench.parse_args([])
    assert (default.target, default.train_len, default.zero_shot) == (16384, 16384, ["base", "pi"])
    assert "pose" not in default.rows and default.output == bench.ROOT / "runs" / "reproduce"
    with pytest.raises(SystemExit):
        bench.parse_args(["--factor", "4", "--rows", "pose"])  # --train-len defaults to the target
    assert "--rows pose trains a window shorter than the target" in capsys.readouterr().err


# --------------------------------------------------------------------------- bench/s2_transfer.py

def test_s2_transfer_probe_is_the_models_attention(tmp_path):
    """The probe (full attention, no window) computes what transformers' own attention does; its
    attention mass by distance sums to 1 per query; a window changes the perplexity."""
    from transformers import LlamaForCausalLM

    from bench import s2_transfer as bench
    from harness.tokenizer import load_tokenizer
    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    text = tmp_path / "book.txt"
    text.write_text("The compleat angler, or the contemplative man's recreation. " * 20)
    sequences = bench.held_out_sequences(load_tokenizer("builtin:bytes"), text, 64, 200)
    assert sequences.shape == (3, 64)
    reference = bench.windowed_ppl(model, sequences, 0)
    bench.install_probe(model)
    assert bench.windowed_ppl(model, sequences, 0) == pytest.approx(reference, rel=1e-4)
    assert bench.windowed_ppl(model, sequences, 8) != pytest.approx(reference, rel=1e-4)
    mass = torch.tensor(bench.attention_mass(model, sequences, (0, 4, 16, 32, 64)))  # (layers, heads, buckets)
    assert mass.shape == (2, 4, 4) and torch.allclose(mass.sum(-1), torch.ones(2, 4), atol=1e-5)


# --------------------------------------------------------------------------- bench/sequence_parallel.py

def test_sequence_parallel_plan_and_tiled(tmp_path, monkeypatch):
    import bench.sequence_parallel as bench

    children_here(monkeypatch, bench)
    # the planner table over one model, card, two counts and two variants: the same code, 1/50 of the cells
    monkeypatch.setattr(bench, "PLAN_MODELS", {"llama2-7b": "recipes/llama2_7b_8k.toml"})
    monkeypatch.setattr(bench, "PLAN_CARDS", {"80 GB": "a100-80gb"})
    monkeypatch.setattr(bench, "PLAN_COUNTS", (1, 2))
    monkeypatch.setattr(bench, "PLAN_LENGTHS", (32768,))
    monkeypatch.setattr(bench, "PLAN_VARIANTS", {"plain": (), "tiled": ("train.tiled_mlp=true",)})
    assert bench.main(["--parts", "plan", "tiled", "--model", "llama-tiny", "--tiled-lengths", "256",
                       "--results-dir", str(tmp_path)]) == 0
    plan = written(tmp_path / "sequence_parallel_plan.json")["rows"]
    assert len(plan) == 4 and all("error" not in row and row["longest_fitting"] > 0 for row in plan)
    longest = {(row["cards"], row["variant"]): row["longest_fitting"] for row in plan}
    assert longest[2, "plain"] > longest[1, "plain"]  # sequence parallelism over 2 cards reaches further
    tiled = written(tmp_path / "sequence_parallel.json")["tiled"]
    assert [(row["tiled_mlp"], row["status"]) for row in tiled] == [(False, "ok"), (True, "ok")]
    for row in tiled:
        assert row["peak_bytes"] >= row["before_bytes"] and finite_loss(row["loss"])
        assert row["planned_dynamic_bytes"] > 0
    assert tiled[0]["loss"] == pytest.approx(tiled[1]["loss"], rel=1e-4)  # tiling changes memory, not the loss


@pytest.mark.slow
def test_sequence_parallel_sp_on_two_ranks(tmp_path):
    """The sp part: 3 steps on 1 rank and on 2 DeepSpeed sequence-parallel ranks (minutes)."""
    import bench.sequence_parallel as bench

    # 4096: the model's window
    assert bench.main(["--parts", "sp", "--sp-length", "4096", "--results-dir", str(tmp_path)]) == 0
    rows = written(tmp_path / "sequence_parallel.json")["sp"]
    assert [(row["ranks"], row["status"]) for row in rows] == [(1, "ok"), (2, "ok")]
    assert len(rows[1]["peak_rss_per_rank_bytes"]) == 2


# --------------------------------------------------------------------------- bench/testbed.py

def test_testbed_reports_a_grid(tmp_path, monkeypatch):
    """main past the grid (tests/test_testbed.py runs the grid itself): tables, targets, JSON, figures."""
    import bench.testbed as bench

    native = 256
    records = [{"name": name, "label": name, "protocol": protocol, "length": length, "ppl": ppl * (1 + length / 4096),
                "tokens": 1000}
               for name, ppl in (("base", 8.0), ("pi", 9.0), ("longqlora", 7.5)) for protocol in bench.PROTOCOLS
               for length in (64, 128, 256, 512, 1024)]
    training = {"longqlora": {"tokens_per_s": 900.0, "peak_memory_gib": 0.5, "steps": 2, "tokens_seen": 4096,
                              "loss": [[1, 3.0], [2, 2.5]], "wall_s": 10.0}}
    record = {"steps": 10, "tokens": 20480, "plateau": True, "train_loss": [[1, 5.0], [10, 3.0]],
              "validation_loss": [[10, 3.1]]}
    monkeypatch.setattr(bench, "run_grid", lambda args: (tmp_path / "testbed", records, training))
    monkeypatch.setattr(bench.tb, "native_window", lambda testbed: native)
    monkeypatch.setattr(bench.tb, "read_record", lambda testbed: record)
    bench.main(["--rows", "base,pi,longqlora", "--results", "smoke", "--output", str(tmp_path / "runs")])
    result = written(tmp_path / "results" / "smoke.json")
    assert result["config"]["lengths"] == [64, 128, 256, 512, 1024] and len(result["rows"]) == len(records)
    base, longqlora = (next(r["ppl"] for r in records if (r["name"], r["length"]) == key)
                       for key in (("base", native), ("longqlora", 4 * native)))
    assert result["targets"]["longqlora_top_vs_base_1x"]["value"] == pytest.approx(longqlora / base)
    assert all((tmp_path / "results" / f"smoke{suffix}.png").is_file() for suffix in ("", "_loss"))


# --------------------------------------------------------------------------- bench/train_step.py

def test_train_step(tmp_path, monkeypatch):
    import bench.train_step as bench

    children_here(monkeypatch, bench)
    output = tmp_path / "train_step.json"
    bench.main(["--model", "llama-tiny", "--setups", "bf16-lora-full", "longqlora", "--lengths", "256",
                "--steps", "1", "--output", str(output)])
    rows = written(output)["rows"]
    assert [(row["setup"], row["status"]) for row in rows] == [("bf16-lora-full", "ok"), ("longqlora", "ok")]
    for row in rows:
        assert row["tokens_per_s"] > 0 and all(finite_loss(x) for x in row["losses"]), row
        assert row["baseline"] == "bf16-lora-full" and row["memory_vs_baseline"] > 0
        assert 0 < row["gemm_share"] <= row["gemm_attention_share"] <= 1  # the profiled step
    assert rows[1]["weights_dtype"] == "float32"  # NF4's other weights on the CPU


def test_train_step_keeps_the_llama2_shapes_for_gpus(tmp_path, capsys):
    import bench.train_step as bench

    if torch.cuda.is_available():
        pytest.skip("a GPU is there")
    with pytest.raises(SystemExit):
        bench.main(["--model", "llama2-7b", "--output", str(tmp_path / "train_step.json")])
    assert "--model llama2-7b is a GPU benchmark" in capsys.readouterr().err
