"""Perplexity of one or more models at several context lengths (strided or LongLoRA protocol).

    python tools/eval_ppl.py --model runs/tiny/final --data ../shared/data/books --seq-lens 256,512 \
        --json ppl.json --plot ppl.png

See `--help`; the implementation is harness.evaluation.cli.
"""
import sys

from harness.evaluation.cli import eval_ppl_main

if __name__ == "__main__":
    sys.exit(eval_ppl_main())
