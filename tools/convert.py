"""From checkpoint to usable model.

    python tools/convert.py zero-to-adapter runs/x/checkpoint-500 runs/x/adapter-500
    python tools/convert.py merge runs/x/final runs/x/merged [--base MODEL] [--dtype bf16|fp16|fp32] \
        [--base-weights dequantized|original] [--verify] [--tolerance REL]

zero-to-adapter turns a ZeRO-2/3 checkpoint into a PEFT adapter directory; merge adds an
adapter (with its trainable embeddings and norms) to a 16-bit base and writes a Hugging Face
model with the extended rope in config.json, plus the tokenizer. Bad input exits 2 with one
line on stderr; a failed --verify exits 1. The implementation is harness.convert.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from harness.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
