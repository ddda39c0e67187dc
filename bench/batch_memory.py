"""Resident memory of `conveyor batch` against input size (not run in CI).

Writes completions batch files of growing size (default 10k, 100k and 1M
lines, ~150 bytes a line), runs each through `conveyor batch` in a fresh
process on a tiny random llama (1 output token a request, so the engine's
work is small and the job's own bookkeeping is what grows), then re-runs the
largest one against its finished output (everything skipped: the resume
index alone). Prints each run's peak RSS next to the input size.

Expected: the peak grows only by the custom_id sets (the resume index and
the duplicate check, ~0.1-0.2 KB an id), far below the input's size, and the
in-flight requests stay at 2 × --max-num-seqs whatever the file's length.

    python bench/batch_memory.py                  # 10k, 100k, 1M lines
    python bench/batch_memory.py --lines 20000    # one size
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs the job in a child and reports its own peak RSS (ru_maxrss is KiB on Linux).
CHILD = """
import engine, resource, sys, json
from pathlib import Path
from engine.entrypoints.batch.batch_job import run_batch_file
s = run_batch_file(Path(sys.argv[1]), Path(sys.argv[2]), model=sys.argv[3],
                   max_num_seqs=int(sys.argv[4]), progress=False,
                   engine_args={"kv_cache_bytes": 64 << 20})
print(json.dumps({"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "done": s.done, "skipped": s.skipped, "failed": s.failed,
                  "peak_in_flight": s.peak_in_flight, "elapsed": s.elapsed}))
"""


def write_input(path: Path, lines: int) -> None:
    with path.open("w") as f:
        for i in range(lines):
            body = {"model": "tiny", "prompt": f"request number {i} of the memory benchmark",
                    "max_tokens": 1, "temperature": 0}
            f.write(json.dumps({"custom_id": f"request-{i:07d}", "method": "POST",
                                "url": "/v1/completions", "body": body}) + "\n")


def run(inp: Path, out: Path, model: Path, max_num_seqs: int) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(inp), str(out), str(model),
                           str(max_num_seqs)], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--max-num-seqs", type=int, default=256)
    args = parser.parse_args()

    import engine  # noqa: F401  (preloads the BLAS before mlx)

    sys.path.insert(0, str(ROOT / "tests"))
    tiny_models = __import__("tiny_models")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_models.write_tiny_llama(tmp / "tiny-llama")
        print(f"{'lines':>10} {'input MB':>9} {'peak RSS MB':>12} {'in flight':>10} "
              f"{'done':>9} {'skipped':>9} {'s':>7}")
        for n in args.lines:
            inp, out = tmp / f"in-{n}.jsonl", tmp / f"out-{n}.jsonl"
            write_input(inp, n)
            r = run(inp, out, model, args.max_num_seqs)
            print(f"{n:>10} {inp.stat().st_size / 1e6:>9.1f} {r['rss_kb'] / 1024:>12.1f} "
                  f"{r['peak_in_flight']:>10} {r['done']:>9} {r['skipped']:>9} "
                  f"{r['wall']:>7.1f}", flush=True)
        # The same file again: every line is answered, only the index is built.
        r = run(inp, out, model, args.max_num_seqs)
        print(f"{'resume':>10} {inp.stat().st_size / 1e6:>9.1f} {r['rss_kb'] / 1024:>12.1f} "
              f"{r['peak_in_flight']:>10} {r['done']:>9} {r['skipped']:>9} {r['wall']:>7.1f}")


if __name__ == "__main__":
    main()
