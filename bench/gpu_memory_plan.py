"""The memory plan on a GPU: does the default plan fill the device and hold?

    PYTHONPATH=$PWD python3 bench/gpu_memory_plan.py [--model llama-8b] [--n 256]

Builds an engine on default settings (the plan prints itself), then prints
what it measured against what a real step takes: the planned activation
peak next to the peak of the first full prefill step of the mixed workload,
and the whole run's peak next to the device's memory, which the plan's
utilization (0.9 by default) must stay under. Every request must finish.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

import engine  # noqa: F401  (preloads the BLAS on the CPU)
from bench import workloads
from bench.synthetic import NullTokenizer, synthetic_model
from engine.core.llm_engine import EngineArgs, LLMEngine
from engine.core.sampling_params import SamplingParams

GIB = 1 << 30


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-8b")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float)
    args = p.parse_args()
    model, config = synthetic_model(args.model, mx.bfloat16)
    weights = mx.get_active_memory()
    t = time.perf_counter()
    eng = LLMEngine(model, NullTokenizer(), config,
                    EngineArgs(gpu_memory_utilization=args.gpu_memory_utilization))
    plan = eng.memory_plan
    total = int(mx.device_info().get("total_memory") or 0) or 1  # CPU: no figure
    print(f"engine start-up {time.perf_counter() - t:.2f} s (plan and pool); weights "
          f"{weights / GIB:.2f} GiB, pool {eng.cache.nbytes / GIB:.2f} GiB, device "
          f"{total / GIB:.2f} GiB, in use now {mx.get_active_memory() / GIB:.2f} GiB", flush=True)
    work = workloads.mixed(args.n)
    reqs = [eng.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True,
                                                   detokenize=False, temperature=0))
            for prompt, n in zip(work.prompts, work.output_lens)]
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    eng.step()  # a full max_num_batched_tokens prefill step
    print(f"first step: {(mx.get_peak_memory() - base) / GIB:.2f} GiB above what was held "
          f"(the plan: {plan.basis})", flush=True)
    t = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
    stats = eng.stats()
    peak = mx.get_peak_memory()
    print(f"run: {time.perf_counter() - t:.1f} s, {stats.generated_tokens} tokens, "
          f"{stats.preemptions} preemptions, peak {peak / GIB:.2f} GiB = "
          f"{peak / total:.3f} of the device; finished "
          f"{sum(r.finished for r in reqs)}/{len(reqs)}", flush=True)


if __name__ == "__main__":
    main()
