"""Where a 64-row CPU decode step goes, part by part.

64 requests of 128 random prompt tokens are prefilled, then 30 decode steps
are timed with wall clocks around each C call of the CPU forward
(engine/platform/cpu_llama.py) and the attention kernel.

    python -m bench.cpu_step_profile [--cpu-matmul int16|int8|float32]
                                     [--temperature T --top-p P]
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np


class _Timed:
    """Wraps the C library: accumulates each function's wall time."""

    def __init__(self, lib, totals):
        self._lib, self._totals = lib, totals

    def __getattr__(self, name):
        fn = getattr(self._lib, name)

        def timed(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self._totals[name] += time.perf_counter() - start
        return timed


def main() -> None:
    import kvcache.paged_cache as paged
    from engine import SamplingParams
    from engine.core.llm_engine import EngineArgs, LLMEngine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-matmul", choices=["int16", "int8", "float32"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    args = p.parse_args()

    totals: dict[str, float] = collections.defaultdict(float)
    attend = paged.PagedLayerView.attend_host

    def timed_attend(self, *a):
        start = time.perf_counter()
        try:
            return attend(self, *a)
        finally:
            totals["attention kernel"] += time.perf_counter() - start

    paged.PagedLayerView.attend_host = timed_attend
    eng = LLMEngine.from_args(EngineArgs(kv_cache_bytes=900 << 20, cpu_matmul=args.cpu_matmul))
    forward = eng.runner.host_forward
    if forward is None:
        raise SystemExit("the C forward does not run here (no native kernels or BLAS)")
    forward.lib = _Timed(forward.lib, totals)
    prompts = np.random.default_rng(0).integers(1000, 40000, size=(64, 128)).tolist()
    params = SamplingParams(max_tokens=args.steps + 20, temperature=args.temperature,
                            top_p=args.top_p, seed=0, ignore_eos=True)
    for prompt in prompts:
        eng.add_request(prompt, params)
    for _ in range(10):  # prefill (4 steps of 2,048 tokens) and a few decode steps
        eng.step()
    totals.clear()
    start = time.perf_counter()
    for _ in range(args.steps):
        eng.step()
    step = (time.perf_counter() - start) / args.steps
    print(f"step {step * 1e3:.1f} ms ({64 / step:.0f} tok/s)")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<17} {seconds / args.steps * 1e3:7.2f} ms")
    rest = step - sum(totals.values()) / args.steps
    print(f"  {'the rest':<17} {rest * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
