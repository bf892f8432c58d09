"""From checkpoint to usable model.

    python tools/convert.py zero-to-adapter runs/x/checkpoint-500 runs/x/adapter-500
    python tools/convert.py merge runs/x/final runs/x/merged [--base MODEL] [--dtype bf16|fp16|fp32] \
        [--base-weights dequantized|original] [--verify] [--tolerance REL]

See `--help`; the command line is harness.cli.convert (also `python -m harness convert`).
"""
import sys

from harness.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
