"""Thin wrapper: `python scripts/run_batch.py ARGS` == `jinfer run-batch ARGS`."""

import sys

from jinfer.cli import main

if __name__ == "__main__":
    sys.exit(main(["run-batch", *sys.argv[1:]]))
