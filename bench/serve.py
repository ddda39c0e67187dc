"""Served throughput: concurrent streaming clients against `conveyor serve`,
next to offline `LLM.generate` on the same workload in the same run (issue 6).

    python -m bench.serve [--n 64] [--input-len 128] [--output-len 128]

The server runs as its own process on 127.0.0.1; each client streams one
/v1/completions request (token-id prompt, greedy, EOS ignored) and records
its time to first token. Reports output tok/s for both and TTFT p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

from bench import workloads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(port: int, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "engine.entrypoints.cli.serve", "--port",
            str(port),
                             "--embedding-model", "none", "--log-level", "warning", *extra])
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


async def _client(http: httpx.AsyncClient, model: str, prompt: list[int],
                  max_tokens: int) -> tuple:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                if first is None:
                    first = time.perf_counter() - start
            tokens += 1
    return first, time.perf_counter() - start


async def _served(port: int, work: workloads.Workload) -> tuple[float, list[float]]:
    limits = httpx.Limits(max_connections=len(work.prompts) + 8)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=3600,
                                 limits=limits) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        await _client(http, model, work.prompts[0][:16], 4)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(_client(http, model, p, n) for p, n in
                                         zip(work.prompts, work.output_lens)))
        return time.perf_counter() - start, [r[0] for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--model")
    args = ap.parse_args()
    work = workloads.decode_heavy(args.n, args.input_len, args.output_len)
    extra = ["--model", args.model] if args.model else []

    port = _free_port()
    proc = _start_server(port, extra)
    try:
        served_s, ttft = asyncio.run(_served(port, work))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    from engine import LLM, SamplingParams

    llm = LLM(args.model)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
              for n in work.output_lens]
    llm.generate([work.prompts[0][:16]], SamplingParams(max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    llm.generate(work.prompts, params, use_tqdm=False)
    offline_s = time.perf_counter() - start

    out = work.num_output_tokens
    ttft_ms = np.array(ttft) * 1e3
    print(f"# decode-heavy {args.n} x {args.input_len} -> {args.output_len}, "
          f"{args.n} concurrent streaming clients")
    print(f"served : {out / served_s:8.1f} out tok/s ({served_s:.1f} s)")
    print(f"offline: {out / offline_s:8.1f} out tok/s ({offline_s:.1f} s)")
    print(f"served / offline: {offline_s / served_s:.2f}")
    print(f"TTFT p50 {np.percentile(ttft_ms, 50):.0f} ms, p99 {np.percentile(ttft_ms, 99):.0f} ms")


if __name__ == "__main__":
    main()
