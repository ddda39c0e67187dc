"""The Ray path's overhead against the single-process batch runner, on the
same cores: the decode-heavy workload (64 × 128 → 128, ignore_eos) as an
OpenAI batch file, run by `conveyor batch` (one process, every core) and by
`conveyor batch --ray ... --ray-workers N` (N actors of one CPU each).

    python bench/ray_batch.py [--model M] [--n 64] [--workers 2] [--rounds 2]

Three runners, alternated round after round (a shared box drifts):
  1 process     `conveyor batch`
  ray, cold     `--ray auto` with no Ray running: the driver starts a local
                Ray, so the wall time includes Ray's own start
  ray, running  `--ray ADDRESS` of a Ray this script started beforehand (as
                a cluster would be): the job alone
Every run is a fresh command, so each time includes loading the model (each
actor loads its own copy, in parallel). The last lines give the ratios
against the single process: the median of the rounds' ratios, and the ratio
of the best walls.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import workloads  # noqa: E402

BOUND = 1.15  # issue 18: the Ray path's overhead at most 15%


def write_batch(path: Path, n: int, input_len: int, output_len: int) -> None:
    work = workloads.decode_heavy(n, input_len, output_len)
    with path.open("w") as f:
        for i, prompt in enumerate(work.prompts):
            body = {"prompt": prompt, "max_tokens": output_len, "ignore_eos": True,
                    "temperature": 0}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                "url": "/v1/completions", "body": body}) + "\n")


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[3:6])}... failed:\n{proc.stderr[-2000:]}")
    return time.monotonic() - start, proc.stderr


def _seconds(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import ray

    # The drivers this script starts join its Ray without an auth token.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    model = ["--model", args.model] if args.model else []
    tokens = args.n * args.output_len
    walls: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "decode_heavy.jsonl"
        write_batch(inp, args.n, args.input_len, args.output_len)
        base = [sys.executable, "-m", "engine.entrypoints.cli", "batch", "-i", str(inp), *model]
        ray_args = ["--ray-workers", str(args.workers)]
        print(f"# decode-heavy batch file: {args.n} x {args.input_len} -> {args.output_len}; "
              f"{args.workers} Ray actors x 1 CPU; {os.cpu_count()} cores")
        print("| round | runner | wall s | out tok/s (wall) | Ray ready s | actors started s "
              "| load 1-min at start, end |")
        print("|---|---|---|---|---|---|---|")
        for r in range(1, args.rounds + 1):
            for name in ("1 process", "ray, cold", "ray, running"):
                out = f"{tmp}/{r}-{name.replace(', ', '-').replace(' ', '')}.jsonl"
                cmd = base + ["-o", out]
                if name == "ray, cold":
                    cmd += ["--ray", "auto", *ray_args]
                elif name == "ray, running":
                    context = ray.init(num_cpus=args.workers, include_dashboard=False,
                                       log_to_driver=False)
                    cmd += ["--ray", context.address_info["gcs_address"], *ray_args]
                load = os.getloadavg()[0]
                try:
                    wall, err = run(cmd, env)
                finally:
                    if ray.is_initialized():
                        ray.shutdown()
                done = re.search(r"(\d+) done, (\d+) failed", err)
                if done is None or done.groups() != (str(args.n), "0"):
                    sys.exit(f"{name}: not every request was answered:\n{err[-2000:]}")
                walls.setdefault(name, []).append(wall)
                ready = _seconds(r" ready in ([\d.]+) s", err)
                actors = _seconds(r"actors started in ([\d.]+) s", err)
                print(f"| {r} | {name} | {wall:.1f} | {tokens / wall:.1f} | {ready:.1f} | "
                      f"{actors:.1f} | {load:.1f}, {os.getloadavg()[0]:.1f} |", flush=True)
    # Each round's runs are close in time, so the median of the per-round
    # ratios resists a load that drifts; the best walls say what a quiet box does.
    for name, label in (("ray, running", "job, Ray already running"),
                        ("ray, cold", "wall, Ray's start included")):
        ratios = [w / s for w, s in zip(walls[name], walls["1 process"], strict=True)]
        ratio = statistics.median(ratios)
        best = min(walls[name]) / min(walls["1 process"])
        verdict = "within" if ratio <= BOUND else "over"
        rounds = ", ".join(f"{x:.2f}" for x in ratios)
        print(f"ray/single ({label}): {ratio:.2f}, median of rounds {rounds} ({verdict} the "
              f"{BOUND:.2f} bound); best walls {best:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
