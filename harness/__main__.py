"""`python -m harness COMMAND ...` and the `harness` console script: see harness.cli."""
import sys

from harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
