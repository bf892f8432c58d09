"""The program every launcher starts: python, accelerate launch, torchrun or deepspeed.

    python launch/train.py RECIPE [section.key=value ...] [--dry-run] [--resume]
    accelerate launch --multi_gpu --num_processes 2 launch/train.py RECIPE
    torchrun --nproc_per_node 2 launch/train.py RECIPE
    deepspeed --num_gpus 2 launch/train.py RECIPE

The command line is harness.cli.train (also `python -m harness train`). The process ends with
harness.cli.train.exit_process: its exit status is the run's, never an abort at interpreter exit.
"""
from harness.cli.train import exit_process, main

if __name__ == "__main__":
    exit_process(main())
