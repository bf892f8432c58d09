"""Fault injection on the tiny recipe: concurrent runs, SIGKILL, damaged checkpoints, failed
exports and changed recipes. Every case checks the exit (code or error), that the message is
one line without a traceback, and that no completed step's work is lost.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness import rundir
from harness.recipe import RecipeError, load_recipe
from harness.resume import ResumeError, intact_checkpoint
from harness.train import TrainError, train
from tests.conftest import ROOT, copy_with_other_weights, free_port, in_repo

BOOK = ROOT / "recipes" / "data" / "the_complete_angler_excerpt.txt"
STEPS = ["train.max_steps=6", "train.save_every=2", "data.max_seq_length=256", "train.keep_checkpoints=0"]


pytestmark = pytest.mark.usefixtures("session_cache")


def tiny(output_dir: Path, *overrides: str):
    return load_recipe("recipes/tiny_cpu.toml", [f"train.output_dir=\"{output_dir}\"", *STEPS, *overrides])


def launch(output_dir: Path, *overrides: str, cache: Path) -> subprocess.Popen:
    command = [sys.executable, "launch/train.py", "recipes/tiny_cpu.toml", f"train.output_dir=\"{output_dir}\"",
               *STEPS, *overrides]
    env = {**os.environ, "HARNESS_CACHE": str(cache), "COLUMNS": "200"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_one_line_error(stderr: str, *words: str) -> None:
    assert "Traceback" not in stderr, stderr
    line = next(line for line in stderr.splitlines() if "error:" in line)
    for word in words:
        assert word in line, stderr


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / rundir.ADAPTER_WEIGHTS))


def assert_same_adapter(a: Path, b: Path) -> None:
    first, second = adapter(a), adapter(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)


def sigterm_at(stop: int):
    return lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == stop else None


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache) -> Path:
    """The uninterrupted run every faulty one must reproduce exactly."""
    output = tmp_path_factory.mktemp("straight") / "run"
    with in_repo(cache):
        train(tiny(output))
    return output


@pytest.fixture
def stopped(tmp_path) -> Path:
    """A run stopped by SIGTERM after step 4: checkpoints 2 and 4, no final/."""
    output = tmp_path / "stopped"
    train(tiny(output), after_step=sigterm_at(4))
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return output


# --------------------------------------------------------------------------- concurrent runs

def test_a_second_run_into_the_same_directory_is_refused(tmp_path):
    cache = Path(os.environ["HARNESS_CACHE"])
    first = launch(tmp_path / "run", "train.max_steps=400", "train.save_every=0", cache=cache)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / rundir.METRICS_FILE).is_file():  # the first run is training
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.5)
        second = launch(tmp_path / "run", "train.overwrite=true", cache=cache)
        _, stderr = second.communicate(timeout=300)
        assert second.returncode == 2
        assert_one_line_error(stderr, "locked by PID", str(first.pid))
    finally:
        first.kill()
        first.communicate()


# --------------------------------------------------------------------------- SIGKILL

@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_moment_then_resume_is_exact(tmp_path, straight, seed):
    """Killed anywhere (a checkpoint write included): every published checkpoint is intact, no
    temporary directory is trusted, and the resumed run ends where the straight one did."""
    cache = Path(os.environ["HARNESS_CACHE"])
    output = tmp_path / "killed"
    process = launch(output, "train.save_every=1", cache=cache)
    chance = random.Random(seed)
    after, delay = chance.randint(1, 3), chance.uniform(0.0, 0.05)  # in the next step or checkpoint write
    deadline = time.monotonic() + 120
    while not (output / f"checkpoint-{after}").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "the run did not reach its checkpoint in time"
        time.sleep(0.01)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    for directory in output.glob("checkpoint-*"):
        rundir.verify_manifest(directory)
    assert not (output / rundir.FINAL_DIR).exists(), "the run ended before the kill"
    train(tiny(output, "train.save_every=1", "train.resume=\"auto\""))
    assert_same_adapter(output / rundir.FINAL_DIR, straight / rundir.FINAL_DIR)


# --------------------------------------------------------------------------- damaged checkpoints

@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_every_damaged_file_of_the_newest_checkpoint_is_found(stopped, damage, capsys):
    """Each file of checkpoint-4 in turn: resume names it and falls back to checkpoint-2."""
    from rich.console import Console

    newest = stopped / "checkpoint-4"
    pristine = stopped.parent / "pristine"
    shutil.copytree(newest, pristine)
    files = sorted(p.relative_to(newest) for p in newest.rglob("*") if p.is_file())
    assert {"adapter_model.safetensors", "optimizer.pt", "rng-0.pt", "trainer_state.json"} <= {str(f) for f in files}
    for name in files:
        shutil.rmtree(newest)
        shutil.copytree(pristine, newest)
        if damage == "truncate":
            (newest / name).write_bytes(b"")
        else:
            (newest / name).unlink()
        if name == Path(rundir.STATE_FILE) and damage == "delete":
            # without its state file a directory is not a checkpoint at all: checkpoint-2 is the newest
            assert intact_checkpoint(stopped, Console(file=open(os.devnull, "w"))) == stopped / "checkpoint-2"
            continue
        console = Console(record=True, width=400)
        assert intact_checkpoint(stopped, console) == stopped / "checkpoint-2", name
        assert str(name) in console.export_text() or rundir.MANIFEST_FILE in console.export_text(), name


def test_resume_past_a_truncated_optimizer_state_is_exact(stopped, straight):
    (stopped / "checkpoint-4" / rundir.OPTIMIZER_FILE).write_bytes(b"")
    train(tiny(stopped, "train.resume=\"auto\""))
    assert_same_adapter(stopped / rundir.FINAL_DIR, straight / rundir.FINAL_DIR)


def test_no_intact_checkpoint_is_a_clear_error(stopped):
    for directory in stopped.glob("checkpoint-*"):
        (directory / rundir.ADAPTER_WEIGHTS).write_bytes(b"")
    with pytest.raises(ResumeError, match="no intact checkpoint.*adapter_model.safetensors"):
        train(tiny(stopped, "train.resume=\"auto\""))


# --------------------------------------------------------------------------- failed exports

@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EROFS])
def test_an_export_that_cannot_be_written_is_rescued(tmp_path, straight, failure, monkeypatch):
    """A full disk or a read-only directory at the very end: the weights survive elsewhere."""
    output = tmp_path / "run"
    write = rundir.write_model_files

    def failing(directory, model, recipe, **options):
        if directory.parent == output:
            raise OSError(failure, os.strerror(failure))
        write(directory, model, recipe, **options)

    monkeypatch.setattr(rundir, "write_model_files", failing)
    with pytest.raises(TrainError, match=os.strerror(failure)) as caught:
        train(tiny(output, "train.save_every=0"))
    message = str(caught.value)
    rescue = Path(message.split("saved to ")[1].split(" instead")[0])
    assert "\n" not in message and not (output / rundir.FINAL_DIR).exists()
    rundir.verify_manifest(rescue)
    assert_same_adapter(rescue, straight / rundir.FINAL_DIR)


# --------------------------------------------------------------------------- changed recipes

def test_resume_refuses_what_it_cannot_honour(stopped):
    with pytest.raises(ResumeError, match=r"train\.lr 0\.002 -> 0\.05"):
        train(tiny(stopped, "train.resume=\"auto\"", "train.lr=0.05"))
    with pytest.raises(ResumeError, match=r"adapter\.r 8 -> 16"):
        train(tiny(stopped, "train.resume=\"auto\"", "adapter.r=16"))
    assert not (stopped / rundir.FINAL_DIR).exists()  # nothing was trained or overwritten


def test_a_finished_run_is_reported_unless_extended(tmp_path, straight):
    output = tmp_path / "run"
    shutil.copytree(straight, output)
    before = adapter(output / rundir.FINAL_DIR)
    with pytest.raises(ResumeError, match="finished run \\(6 steps"):
        train(tiny(output, "train.resume=\"auto\""))
    torch.testing.assert_close(adapter(output / rundir.FINAL_DIR), before, rtol=0, atol=0)
    train(tiny(output, "train.resume=\"auto\"", "train.max_steps=8"))  # allowed: more steps
    records = [json.loads(line) for line in (output / rundir.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))  # re-trained steps logged once
    assert json.loads((output / rundir.FINAL_DIR / rundir.STATE_FILE).read_text())["step"] == 8


@pytest.mark.parametrize("tool", ["eval_ppl", "convert"])
def test_the_tools_refuse_a_damaged_adapter(tmp_path, straight, tool):
    final = tmp_path / "final"
    shutil.copytree(straight / rundir.FINAL_DIR, final)
    (final / rundir.ADAPTER_WEIGHTS).write_bytes(b"")
    command = {"eval_ppl": ["tools/eval_ppl.py", "--model", "", "--adapter", str(final), "--data",
                            "recipes/data/the_complete_angler_excerpt.txt", "--seq-lens", "64"],
               "convert": ["tools/convert.py", "merge", str(final), str(tmp_path / "merged")]}[tool]
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result.stderr, rundir.ADAPTER_WEIGHTS, "damaged")


def _process_of_rank(rank: int) -> int:
    """The PID of the training process with RANK=rank (a torchrun child)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"launch/train.py" in command and b"torchrun" not in command:
            return int(pid)
    raise AssertionError(f"no process of rank {rank}")


@pytest.mark.slow
def test_a_rank_that_dies_leaves_one_clear_line_on_the_others(tmp_path):
    """Also a fresh model cache under 2 ranks: rank 0 must build it alone (transformers writes
    config.json on rank 0 only once torch.distributed is up)."""
    output = tmp_path / "run"
    env = {**os.environ, "COLUMNS": "400", "OMP_NUM_THREADS": "1", "HARNESS_CACHE": str(tmp_path / "cache")}
    env.pop("WORLD_SIZE", None)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    process = subprocess.Popen([torchrun, "--nproc_per_node", "2", f"--master_port={free_port()}", "launch/train.py",
                                "recipes/tiny_cpu.toml",
                                f"train.output_dir=\"{output}\"", *STEPS, "train.max_steps=300", "train.save_every=5"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (output / "checkpoint-5").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    os.kill(_process_of_rank(1), signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    ours = [line for line in stderr.splitlines() if line.startswith("launch/train.py: error:")]
    assert len(ours) == 1 and "rank 0 lost contact with another rank" in ours[0], stderr[-3000:]
    assert "with --resume" in ours[0] and "checkpoint-" in ours[0]
    assert "[rank0]: Traceback" not in stderr


# --------------------------------------------------------------------------- nothing silently wrong

@pytest.mark.parametrize("override, message", [
    ("train.lr=inf", "train.lr = inf must be a finite number > 0"),
    ("train.lr=nan", "train.lr = nan must be a finite number > 0"),
    ("train.max_grad_norm=nan", "train.max_grad_norm = nan must be a finite number >= 0"),
    ("train.max_grad_norm=-1.0", "train.max_grad_norm = -1.0 must be a finite number >= 0"),
    ("position.factor=nan", "position.factor = nan must be a finite number >= 0"),
    ("train.warmup_steps=-5", "train.warmup_steps = -5 must be a finite number >= 0"),
    ("train.save_every=-1", "train.save_every = -1 must be a finite number >= 0"),
    ("adapter.r=0", "adapter.r = 0 must be a finite number > 0"),
    ("adapter.dropout=1.5", "adapter.dropout = 1.5 must be in [0, 1)"),
    ("adapter.r=128", "adapter.r = 128 is larger than the model's hidden size 64"),
])
def test_values_that_would_train_a_broken_model_are_refused_at_load(tmp_path, override, message):
    with pytest.raises(RecipeError) as caught:
        tiny(tmp_path / "run", override)
    assert message in str(caught.value)


def test_an_absurd_learning_rate_is_warned_about(tmp_path, caplog):
    tiny(tmp_path / "run", "train.lr=1e3")
    assert "train.lr = 1000 is far above fine-tuning rates" in caplog.text


def test_non_finite_weights_are_never_published(tmp_path):
    """Weights poisoned after the last step: the export refuses, final/ is not written, the checkpoint stays."""
    def poison(step):
        if step == 4:
            with torch.no_grad():
                next(p for n, p in torch.nn.Module.named_parameters(poison.model) if "lora_A" in n).fill_(float("nan"))

    from harness import train as train_module

    original = train_module.Loop.__init__

    def keep_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        poison.model = self.engine.unwrap()

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module.Loop, "__init__", keep_model)
        with pytest.raises(TrainError, match=r"not finite \(NaN or inf\) after step 4; nothing was written, the newest "
                                             r"checkpoint .*checkpoint-2 is from before it"):
            train(tiny(out, "train.max_steps=4", "train.save_every=2"), after_step=poison)
    assert not (out / "final").exists() and (out / "checkpoint-2").is_dir()


def test_a_non_finite_gradient_stops_the_run_before_it_reaches_the_weights(tmp_path, monkeypatch):
    clip = torch.nn.utils.clip_grad_norm_
    calls = []

    def nan_on_the_third(params, max_norm):
        norm = clip(params, max_norm)
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_on_the_third)
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=r"the gradient norm became nan at step 3: the newest checkpoint "
                                         r".*checkpoint-2 is from before it\. Lower train.lr \(now 0.002\)"):
        train(tiny(out, "train.save_every=2"))
    assert not (out / "final").exists()


def test_resume_refuses_changed_data_unless_allowed(tmp_path, capsys):
    data = tmp_path / "data.txt"
    shutil.copyfile(ROOT / "recipes/data/the_complete_angler_excerpt.txt", data)
    out = tmp_path / "run"
    train(tiny(out, f"data.path=\"{data}\"", "train.max_steps=3", "train.save_every=2"))
    data.write_text(data.read_text() + "\nOne more line.\n")
    resumed = ["train.max_steps=4", "train.save_every=2", "train.resume=\"auto\"", f"data.path=\"{data}\""]
    with pytest.raises(TrainError, match=r"data.path = '.*data.txt' changed since .*checkpoint-2 was saved .* "
                                         r"train.allow_data_change=true"):
        train(tiny(out, *resumed))
    train(tiny(out, *resumed, "train.allow_data_change=true"))
    assert (out / "final").is_dir()


def test_resume_into_an_empty_folder_says_there_was_nothing_to_resume(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny(out, "train.max_steps=1", "train.resume=\"auto\""))
    assert "Nothing to resume in" in " ".join(capsys.readouterr().err.split())


def test_a_home_relative_output_dir_is_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = tiny(Path("~/x"))
    assert recipe.train.output_dir == str(tmp_path / "x")


def test_an_output_dir_inside_the_data_folder_is_refused(tmp_path):
    data = tmp_path / "books"
    data.mkdir()
    shutil.copyfile(ROOT / "recipes/data/the_complete_angler_excerpt.txt", data / "a.txt")
    with pytest.raises(RecipeError, match=r"train.output_dir = '.*books/run' is inside data.path = .*: the run's own "
                                         r"files would be read as training data"):
        tiny(data / "run", f"data.path=\"{data}\"")


def losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_stop_signal_between_micro_batches_drops_the_step_and_resumes_exactly(tmp_path, monkeypatch):
    """grad_accum 3: SIGTERM after the 2nd micro-batch of step 2 stops there (not after 3 more); the
    checkpoint is step 1's, and resuming gives the straight run's losses."""
    from harness import checkpoint
    from harness.backends.accelerate_engine import AccelerateEngine

    accum = ["train.grad_accum=3", "train.max_steps=3", "train.save_every=0"]
    train(tiny(tmp_path / "straight", *accum))
    backward, calls = AccelerateEngine.backward, []

    def signalled(self, loss, sync):
        backward(self, loss, sync=sync)
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AccelerateEngine, "backward", signalled)
        train(tiny(tmp_path / "stopped", *accum))
    assert len(calls) == 5 and [p.name for _, p in checkpoint.checkpoints(tmp_path / "stopped")] == ["checkpoint-1"]
    train(tiny(tmp_path / "stopped", *accum, "train.resume=\"auto\""))
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")


def test_more_samples_a_step_than_the_data_holds_is_a_clear_error(tmp_path):
    with pytest.raises(TrainError, match=r"one optimizer step takes 100,000,000 samples .* but the data holds \d+: "
                                         r"lower train.grad_accum"):
        train(tiny(tmp_path / "run", "train.grad_accum=100000000"))


def test_a_data_path_that_is_a_link_loop_is_named_at_load(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(RecipeError, match=r"data.path = '.*loop' is a symbolic link that leads nowhere"):
        tiny(tmp_path / "run", f"data.path=\"{tmp_path / 'loop'}\"")


def test_eval_ppl_takes_the_base_from_the_adapters_saved_recipe(tmp_path, straight):
    from harness.cli.eval_ppl import main as eval_ppl

    scores = []
    for model in ([], ["--model", ""]):
        out = tmp_path / f"ppl{len(scores)}.json"
        assert eval_ppl([*model, "--adapter", str(straight / "final"), "--data", str(BOOK), "--seq-lens", "64",
                         "--max-tokens", "500", "--json", str(out)]) == 0
        scores.append(json.loads(out.read_text())["results"][0]["ppl"])
    assert scores[0] == scores[1]
    assert eval_ppl(["--data", "x.txt", "--seq-lens", "64"]) == 2  # neither --model nor --adapter: a usage error


def test_a_run_directory_removed_mid_run_stops_the_run_at_the_next_save(tmp_path):
    out = tmp_path / "run"

    def remove(step):
        if step == 3:
            shutil.rmtree(out)

    with pytest.raises(TrainError, match=r"run was removed or emptied while this run trained into it "
                                         r"\(its lock file is gone\) at step 4: stopping without writing"):
        train(tiny(out, "train.save_every=2"), after_step=remove)
    assert not out.exists()


def test_an_adapter_on_a_base_with_other_weights_is_warned_about(tmp_path, straight, caplog):
    """The tiny run's base is a random model (cached); a copy with one weight changed has the same shape."""
    from harness.model import load_for_eval

    saved = rundir.read_recipe(straight / "final")
    assert len(saved.resolved.base_fingerprint) == 16
    base = Path(load_for_eval("", adapter=str(straight / "final"))[0].get_base_model().config._name_or_path)
    other = copy_with_other_weights(base, tmp_path / "other-base")
    caplog.clear()
    load_for_eval(str(base), adapter=str(straight / "final"))
    assert "weight files differ" not in caplog.text
    load_for_eval(str(other), adapter=str(straight / "final"))
    assert "was trained on a base whose weight files differ from those of" in caplog.text
