"""Perplexity of one or more models at several context lengths (strided or LongLoRA protocol).

    python tools/eval_ppl.py --model runs/tiny/final --data recipes/data/books --seq-lens 256,512 \
        --json ppl.json --plot ppl.png

See `--help`; the command line is harness.cli.eval_ppl (also `python -m harness eval_ppl`).
"""
import sys

from harness.cli.eval_ppl import main

if __name__ == "__main__":
    sys.exit(main())
