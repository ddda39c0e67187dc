"""Mutated model files either load or fail with ModelLoadError (issue 16).

Three campaigns, each in a child process (tests/model_file_fuzz.py) with a
capped address space and a wall-clock guard, so a crash, a hang or runaway
memory fails here instead of taking pytest down:
- random byte edits of a valid tiny GGUF, imported then loaded;
- random byte edits of a valid tiny safetensors file, loaded;
- hypothesis replacing config.json values with arbitrary JSON values.
CONVEYOR_FUZZ_EXAMPLES raises the number of examples for a deeper run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = Path(__file__).resolve().parent / "model_file_fuzz.py"
EXAMPLES = int(os.environ.get("CONVEYOR_FUZZ_EXAMPLES", "200"))
HANG_GUARD_S = 300   # a campaign takes seconds: this only catches a hang
# The CPU platform lets MLX keep up to 2 GiB of freed buffers for reuse
# (engine/platform/cpu.py), which counts in RSS; a runaway allocation (a config
# with millions of layers) goes far past this, into the address-space cap.
MAX_RSS_KB = 3_500_000


def run_campaign(name: str, seed: int) -> tuple[list[dict], dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        done = subprocess.run([sys.executable, str(FUZZ), name, str(EXAMPLES), str(seed)],
                              capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=ROOT,
                              env=env)
    except subprocess.TimeoutExpired as exc:
        lines = (exc.stdout or b"").decode(errors="replace").strip().splitlines()
        pytest.fail(f"{name} fuzzing hung; last finished: {lines[-1:] or 'none'}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, (f"{name} fuzzing died (rc {done.returncode}) after "
                                  f"{lines[-1:]}: {done.stderr[-3000:]}")
    return lines[:-1], lines[-1]


@pytest.mark.parametrize("name, seed", [("gguf", 0), ("safetensors", 0), ("config", 0)])
def test_mutated_model_files_load_or_raise_model_load_error(name, seed):
    cases, summary = run_campaign(name, seed)
    assert summary["failures"] == [], summary["failures"]
    assert len(cases) == EXAMPLES and sum(summary["counts"].values()) == EXAMPLES
    # Both outcomes occur: the mutations reach past the first check, and some
    # files survive (edits inside tensor data, values that stay valid).
    assert summary["counts"].get("ModelLoadError", 0) > 0, summary
    assert summary["counts"].get("loaded", 0) > 0, summary
    assert summary["max_rss_kb"] < MAX_RSS_KB, summary
