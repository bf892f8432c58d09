"""Text from an extended model, streamed; --chat for a conversation with history.

    python tools/generate.py --adapter runs/tiny/final --prompt "The angler" --max-new-tokens 64
    python tools/generate.py --model runs/tiny/merged --chat --temperature 0.7 --top-p 0.9

See `--help`; the command line is harness.cli.generate (also `python -m harness generate`).
"""
import sys

from harness.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
