"""`python -m bench ...` is `conveyor bench ...` (for machines without the console script)."""

import sys

import engine  # noqa: F401  (preloads the BLAS)
from engine.entrypoints.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
