"""Passkey retrieval accuracy of a model over prompt lengths x key depths.

    python tools/passkey.py --model runs/tiny/final --lengths 1024,2048 --depths 0,0.5,1 --trials 5 \
        --json passkey.json --plot passkey.png

See `--help`; the command line is harness.cli.passkey (also `python -m harness passkey`).
"""
import sys

from harness.cli.passkey import main

if __name__ == "__main__":
    sys.exit(main())
