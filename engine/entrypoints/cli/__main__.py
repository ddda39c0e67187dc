"""`python -m engine.entrypoints.cli`: the `conveyor` command."""

import sys

from engine.entrypoints.cli import main

sys.exit(main())
