"""The Ray path's overhead against the single-process batch runner, on the
same cores: the decode-heavy workload (64 × 128 → 128, ignore_eos) as an
OpenAI batch file, run by `conveyor batch` (one process, every core) and by
`conveyor batch --ray auto --ray-workers N` (N actors of one CPU each).

    python bench/ray_batch.py [--model M] [--n 64] [--workers 2]

Each run is a fresh command, so both times include loading the model; the
Ray run also includes starting a local Ray and its actors, reported apart.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import workloads  # noqa: E402


def write_batch(path: Path, n: int, input_len: int, output_len: int) -> None:
    work = workloads.decode_heavy(n, input_len, output_len)
    with path.open("w") as f:
        for i, prompt in enumerate(work.prompts):
            body = {"prompt": prompt, "max_tokens": output_len, "ignore_eos": True,
                    "temperature": 0}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                "url": "/v1/completions", "body": body}) + "\n")


def run(cmd: list[str]) -> tuple[float, str]:
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.monotonic() - start, proc.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    model = ["--model", args.model] if args.model else []
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "decode_heavy.jsonl"
        write_batch(inp, args.n, args.input_len, args.output_len)
        base = [sys.executable, "-m", "engine.entrypoints.cli", "batch", "-i", str(inp), *model]
        rows = [("1 process", base + ["-o", f"{tmp}/single.jsonl"]),
                (f"ray, {args.workers} actors x 1 CPU",
                 base + ["-o", f"{tmp}/ray.jsonl", "--ray", "auto",
                         "--ray-workers", str(args.workers)])]
        tokens = args.n * args.output_len
        print(f"# decode-heavy batch file: {args.n} x {args.input_len} -> {args.output_len}")
        print("| runner | wall s | out tok/s (wall) | Ray start s | job s after it (model "
              "load included) | out tok/s (job) |")
        print("|---|---|---|---|---|---|")
        for name, cmd in rows:
            wall, err = run(cmd)
            job = float(re.search(r"tokens in ([\d.]+) s", err).group(1))
            started = re.search(r"actors started in ([\d.]+) s", err)
            ray_start = float(started.group(1)) if started else 0.0
            print(f"| {name} | {wall:.1f} | {tokens / wall:.1f} | {ray_start:.1f} | "
                  f"{job - ray_start:.1f} | {tokens / (job - ray_start):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
