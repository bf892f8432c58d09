"""`python -m harness backends` lists the backends; `python -m harness train ...` trains."""
import sys

from harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
