"""Ulysses sequence parallelism on 2 CPU ranks over gloo against one process: the same function.

With engine.sequence_parallel_size = 2 on 2 ranks there is one data-parallel replica, so both
ranks train on the same micro-batch, each on half of every sequence, and read the samples one
process reads with the same micro_batch_size and grad_accum. Everything is fp32 and dropout is
off: the runs differ only in float summation order (attention over gathered heads, the loss
summed over two shards, gradients reduced over gloo), so loss curves and exported adapter
weights agree to 1e-5 (measured: ~2e-7). S2 runs on the tiny recipe's 4 heads / 2 KV heads:
rank 0 holds the unshifted KV head and its 2 query heads, rank 1 the shifted ones, so a split
by the local head index instead of the global one would fail here.

The default suite runs S2 over packed documents (documents restart position_ids inside rows,
and a document crosses the shard boundary); the slow ones full attention, padding (truncate
mode, micro-batches of 2 with documents of different lengths), tiled MLP under SP, exact
resume, ZeRO-2 / ZeRO-3 exports, and a launch whose world size N does not divide.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

VENV_BIN = Path(sys.executable).parent
COMMON = ["train.max_steps=3", "adapter.dropout=0.0", "data.max_seq_length=256", "train.grad_accum=2"]
SP2 = ["engine.name=\"deepspeed\"", "engine.deepspeed_config=\"launch/deepspeed/zero2_sp.json\"",
       "engine.sequence_parallel_size=2"]
TOLERANCE = 1e-5


def launch(launcher: list[str], output_dir: Path, *overrides: str, cache: Path, check: bool = True,
           timeout: int = 1200):
    env = {**os.environ, "HARNESS_CACHE": str(cache), "COLUMNS": "200", "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")])}
    env.pop("WORLD_SIZE", None)
    command = [*launcher, "launch/train.py", "recipes/tiny_cpu.toml", f"train.output_dir=\"{output_dir}\"",
               *COMMON, *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def losses(output_dir: Path, key: str = "loss") -> list[float]:
    records = map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
    return [record[key] for record in records if key in record]


def one_process(output_dir: Path, *overrides: str, cache: Path) -> list[float]:
    launch([sys.executable], output_dir, *overrides, cache=cache)
    return losses(output_dir)


def two_ranks(output_dir: Path, *overrides: str, cache: Path, port: int) -> list[float]:
    launch([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)], output_dir, *SP2,
           *overrides, cache=cache)
    return losses(output_dir)


def adapter(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def assert_same_adapter(got: Path, expected: Path) -> float:
    """Equal key sets and shapes; every tensor within TOLERANCE; returns the largest difference."""
    weights, reference = adapter(got), adapter(expected)
    assert weights.keys() == reference.keys() and len(reference) == 2 * 7 * 2  # A, B x 7 projections x 2 layers
    worst = 0.0
    for name, tensor in reference.items():
        assert weights[name].shape == tensor.shape, name
        worst = max(worst, float((weights[name] - tensor).abs().max()))
    assert worst <= TOLERANCE, worst
    return worst


def write_documents(path: Path, lengths: list[int]) -> Path:
    """A .jsonl file of documents cut from the shipped excerpt, of the given byte lengths."""
    text = (ROOT / "recipes" / "data" / "the_complete_angler_excerpt.txt").read_text(encoding="utf-8")
    text = text.encode("ascii", "ignore").decode()
    start, lines = 0, []
    for length in lengths:
        lines.append(json.dumps({"text": text[start:start + length]}))
        start += length
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sp-cache")


@pytest.fixture(scope="module")
def packed_documents(tmp_path_factory):
    """Documents of 90-200 bytes packed into rows of 256 tokens: several documents per row."""
    lengths = [90, 150, 200, 120, 170, 100, 140, 190, 110, 160, 130, 180] * 2
    return write_documents(tmp_path_factory.mktemp("packed") / "docs.jsonl", lengths)


@pytest.mark.slow  # 23 s; the SP kernels are checked in one process by tests/backends/test_sequence_parallel.py
def test_s2_over_packed_documents_matches_one_process(tmp_path, cache, packed_documents):
    """Training (S2) and, after step 3, evaluation on held-out rows (full attention, model.eval())."""
    data = [f"data.path=\"{packed_documents}\"", "data.mode=\"pack\"", "data.eval_fraction=0.2", "train.eval_every=3"]
    single = one_process(tmp_path / "single", *data, cache=cache)
    sharded = two_ranks(tmp_path / "sp", *data, cache=cache, port=29621)
    assert len(single) == 3 and len(set(single)) == 3
    assert sharded == pytest.approx(single, abs=TOLERANCE)
    evaluated = losses(tmp_path / "single", "eval_loss")
    assert len(evaluated) == 1 and losses(tmp_path / "sp", "eval_loss") == pytest.approx(evaluated, abs=TOLERANCE)
    assert_same_adapter(tmp_path / "sp" / "final", tmp_path / "single" / "final")


@pytest.mark.slow
def test_full_attention_with_an_offloaded_optimizer_matches_one_process(tmp_path, cache):
    """Full attention (sdpa through harness.backends.s2.causal_attention); ZeRO-2 with DeepSpeed's CPU Adam."""
    full = ["attention.name=\"full\""]
    single = one_process(tmp_path / "single", *full, cache=cache)
    offload = "engine.deepspeed_config=\"launch/deepspeed/zero2_offload.json\""
    assert two_ranks(tmp_path / "sp", *full, offload, cache=cache, port=29622) == pytest.approx(single, abs=TOLERANCE)
    assert_same_adapter(tmp_path / "sp" / "final", tmp_path / "single" / "final")


@pytest.mark.slow
def test_padding_matches_one_process(tmp_path, cache):
    """Truncate mode, micro-batches of 2 documents of different (even) token counts: the shorter is
    padded, the padding lands on either rank's shard; S2 and full attention."""
    lengths = [60, 250, 120, 300, 180, 90, 222, 40, 140, 270, 100, 200]  # + BOS + EOS: even token counts
    documents = write_documents(tmp_path / "docs.jsonl", lengths)
    for attention in ("s2", "full"):
        case = [f"data.path=\"{documents}\"", "data.mode=\"truncate\"", "train.micro_batch_size=2",
                f"attention.name=\"{attention}\""]
        single = one_process(tmp_path / f"single-{attention}", *case, cache=cache)
        sharded = two_ranks(tmp_path / f"sp-{attention}", *case, cache=cache, port=29623)
        assert sharded == pytest.approx(single, abs=TOLERANCE), attention
        assert_same_adapter(tmp_path / f"sp-{attention}" / "final", tmp_path / f"single-{attention}" / "final")


@pytest.mark.slow
def test_tiled_mlp_under_sequence_parallelism_matches_one_untiled_process(tmp_path, cache):
    """Sequences of 16k tokens: each rank's 8k are 2 tiles (harness.tiled.TILE_FLOOR = 4096 tokens)."""
    long = ("data.max_seq_length=16384", "position.target_length=16384", "train.max_steps=2")
    single = one_process(tmp_path / "single", *long, cache=cache)
    tiled = two_ranks(tmp_path / "sp", *long, "train.tiled_mlp=true", cache=cache, port=29624)
    assert tiled == pytest.approx(single, abs=TOLERANCE)
    assert_same_adapter(tmp_path / "sp" / "final", tmp_path / "single" / "final")


@pytest.mark.slow
def test_resume_under_sequence_parallelism_is_exact_and_zero2_exports_load(tmp_path, cache):
    """A straight 4-step SP run against one stopped after 3 with checkpoint-2, resumed to 4: the resumed
    steps 3 and 4 and the adapter are the straight run's. checkpoint-2 converts to an adapter that peft loads."""
    straight = two_ranks(tmp_path / "straight", "train.max_steps=4", "train.save_every=2", cache=cache, port=29625)
    two_ranks(tmp_path / "resumed", "train.max_steps=3", "train.save_every=2", cache=cache, port=29625)
    resumed = two_ranks(tmp_path / "resumed", "train.max_steps=4", "train.save_every=2", "train.resume=\"auto\"",
                        cache=cache, port=29625)
    assert resumed == pytest.approx(straight, abs=1e-6)
    assert_same_adapter(tmp_path / "resumed" / "final", tmp_path / "straight" / "final")
    _check_export(tmp_path / "straight" / "checkpoint-2", tmp_path / "export", cache)


@pytest.mark.slow
def test_zero3_under_sequence_parallelism_matches_one_process_and_exports(tmp_path, cache):
    unquantized = ("quantization.name=\"none\"",)
    single = one_process(tmp_path / "single", *unquantized, cache=cache)
    zero3 = two_ranks(tmp_path / "sp", *unquantized, "engine.deepspeed_config=\"launch/deepspeed/zero3.json\"",
                      "train.save_every=2", cache=cache, port=29626)
    assert zero3 == pytest.approx(single, abs=TOLERANCE)  # ZeRO-3 averages over the SP ranks: scaled back by N
    assert_same_adapter(tmp_path / "sp" / "final", tmp_path / "single" / "final")
    _check_export(tmp_path / "sp" / "checkpoint-2", tmp_path / "export", cache)


def _check_export(checkpoint: Path, out: Path, cache: Path) -> None:
    """tools/convert.py zero-to-adapter on an SP checkpoint: the checkpoint's own adapter, loadable by peft."""
    env = {**os.environ, "HARNESS_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "tools/convert.py", "zero-to-adapter", str(checkpoint), str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for name, tensor in adapter(checkpoint).items():
        assert float((adapter(out)[name] - tensor).abs().max()) <= 1e-6, name
    from peft import PeftModel

    from harness.model import build_model
    from harness.rundir import read_recipe

    recipe = read_recipe(out)
    base = build_model(recipe, training=False, with_adapter=False).model
    loaded = PeftModel.from_pretrained(base, str(out))
    assert sum("lora_A" in name for name, _ in loaded.named_parameters()) == 7 * 2


@pytest.mark.slow
def test_a_world_size_that_n_does_not_divide_is_refused(tmp_path, cache):
    result = launch([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29627"], tmp_path / "run",
                    *SP2[:2], "engine.sequence_parallel_size=4", cache=cache, check=False)
    assert result.returncode != 0
    assert "engine.sequence_parallel_size = 4 does not divide the 2 launched processes" in result.stderr + result.stdout
