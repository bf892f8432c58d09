"""Predict a recipe's peak GPU memory on a card, without loading the model.

    python tools/plan_memory.py recipes/llama2_13b_12k.toml --gpu v100-32gb
    python tools/plan_memory.py recipes/llama2_7b_8k.toml data.max_seq_length=32768 --gib 24 --json

See `--help`; the command line is harness.cli.plan_memory (also `python -m harness plan_memory`).
"""
import sys

from harness.cli.plan_memory import main

if __name__ == "__main__":
    sys.exit(main())
