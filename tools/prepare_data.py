"""Tokenize text into a LongLoRA-style .bin token file (plus its OUT.bin.json sidecar).

    python tools/prepare_data.py --tokenizer T --input FILE_OR_DIR [...] --output OUT.bin

See `--help`; the command line is harness.cli.prepare_data (also `python -m harness prepare_data`).
"""
import sys

from harness.cli.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
