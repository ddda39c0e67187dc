import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import smollm_dir  # noqa: E402,F401  (the default model, cached)
