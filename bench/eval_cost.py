"""What the default long-context watch costs: evaluation time against training time.

    python bench/eval_cost.py [--steps 80]
    python bench/eval_cost.py --recipe recipes/tiny_cpu.toml --steps 2 --output /tmp/eval_cost.json   # a smoke run

Trains recipes/testbed_longqlora.toml (the testbed's shape: 6 layers, 1024-token target, S2,
NF4 + LoRA r64; random weights, which cost what trained ones do) with the defaults a recipe
gets when it names no held-out data: train.eval_holdout = 4 samples, train.eval_every = -1
(harness.policy.eval_cadence). The share is the evaluations' wall time (metrics.jsonl
eval_seconds) over the steps' (seconds), measured in the same run. Also prints the cadence the
same rule plans for recipes/llama2_13b_12k.toml. Table, then JSON in bench/results/eval_cost.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS_DIR, child_env, machine, shown  # noqa: E402
from harness import policy  # noqa: E402
from harness.recipe import load_recipe  # noqa: E402

RECIPE = "recipes/testbed_longqlora.toml"
DEFAULT_WATCH = ["train.eval_every=-1", "train.eval_batches=0", "train.save_every=0"]


def planned_cadence(recipe_path: str, samples: int = 4) -> dict:
    """The auto cadence of a recipe's default watch (one replica): steps between evaluations."""
    recipe = load_recipe(ROOT / recipe_path)
    train, resolved = recipe.train, recipe.resolved
    readings = 1 + (resolved.seq_len > resolved.original_context) + (train.eval_s2 and recipe.attention.name == "s2")
    every = policy.eval_cadence(samples=samples, readings=readings, micro_batch_size=train.micro_batch_size,
                                grad_accum=train.grad_accum, checkpointing=train.gradient_checkpointing)
    return {"recipe": recipe_path, "samples": samples, "readings": readings, "every": every,
            "evaluations": -(-train.max_steps // every)}


def measured_share(steps: int, recipe: str = RECIPE) -> dict:
    """Train the testbed recipe with the default watch; the evaluations' share of the wall time."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "launch/train.py", recipe, f"train.output_dir=\"{out}\"", f"train.max_steps={steps}",
                   *DEFAULT_WATCH]
        subprocess.run(command, cwd=ROOT, env=child_env(glibc_defaults=False), check=True, capture_output=True)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    training = sum(r["seconds"] for r in records if "loss" in r)
    evaluating = [r["eval_seconds"] for r in records if "eval_seconds" in r]
    return {"steps": steps, "evaluations": len(evaluating), "train_s": training, "eval_s": sum(evaluating),
            "share": sum(evaluating) / training}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--recipe", default=RECIPE, help="the recipe trained (a smaller one for a smoke run)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "eval_cost.json")
    args = parser.parse_args(argv)
    testbed = planned_cadence(args.recipe) | measured_share(args.steps, args.recipe)
    planned = planned_cadence("recipes/llama2_13b_12k.toml")
    print(f"{'recipe':<34} {'every':>6} {'evaluations':>12} {'train s':>9} {'eval s':>8} {'share':>7}")
    print(f"{args.recipe:<34} {testbed['every']:>6} {testbed['evaluations']:>12} {testbed['train_s']:>9.1f} "
          f"{testbed['eval_s']:>8.1f} {testbed['share']:>7.1%}")
    print(f"{planned['recipe']:<34} {planned['every']:>6} {planned['evaluations']:>12} {'(planned)':>9}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "testbed": testbed, "llama2_13b_12k": planned, "budget": policy.EVAL_SHARE}
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {shown(args.output)}")


if __name__ == "__main__":
    main()
