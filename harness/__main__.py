"""`python -m harness COMMAND ...` and the `harness` console script: see harness.cli.
`train` ends as launch/train.py does (harness.cli.train.exit_process)."""
import sys

from harness.cli import main

if __name__ == "__main__":
    code = main()
    if sys.argv[1:2] == ["train"]:
        from harness.cli.train import exit_process

        exit_process(code)
    sys.exit(code)
