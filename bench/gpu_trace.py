"""The GPU's own timeline of a decode-heavy run, step by step.

Run on the GPU machine (see shared/gpu/README.md; torch is there, not a
Conveyor dependency):
    PYTHONPATH=$PWD python3 -m bench.gpu_trace [--model llama-8b] [--n 256]

torch.profiler's CUPTI tracing sees every kernel of the process, MLX's CUDA
graphs included, and every CUDA API call. Each engine step is a named
range; for each step this prints its wall time, the time the GPU was busy
(the union of its kernels), and, over the decode steps and the first prompt
steps, the time and count of each kernel and the API calls' time. The
warm-up run uses other prompts' cache state: the prefix cache is reset, so
the traced run computes its prompts (bench/results/h200_s10_trace.log; a run
whose prompts hit the cache shows no prefill, h200_s10_trace_cached_prompts.log).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import tempfile

import mlx.core as mx

from bench import workloads
from bench.synthetic import SHAPES, NullTokenizer, synthetic_model


def traced_steps(name: str, n: int) -> list[dict]:
    try:
        from torch.profiler import ProfilerActivity, profile, record_function
    except ImportError as exc:
        raise SystemExit(f"bench.gpu_trace needs torch (its CUPTI profiler): {exc}")
    from engine.core.llm_engine import EngineArgs, LLMEngine
    from engine.core.sampling_params import SamplingParams

    model, config = synthetic_model(name, mx.bfloat16)
    eng = LLMEngine(model, NullTokenizer(), config, EngineArgs())

    def submit(out_len):
        for p in workloads.decode_heavy(n, 128, out_len).prompts:
            eng.add_request(p, SamplingParams(temperature=0, max_tokens=out_len,
                                              ignore_eos=True, detokenize=False))

    submit(8)  # compiles graphs and kernels at these shapes
    while eng.has_unfinished():
        eng.step()
    mx.synchronize()
    eng.reset_prefix_cache()
    submit(128)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        k = 0
        while eng.has_unfinished():
            with record_function(f"step{k}"):
                eng.step()
            k += 1
        mx.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    return per_step(events)


def _spans(events, keep) -> list[tuple[float, float, str]]:
    return sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                  if e.get("ph") == "X" and keep(e))


def per_step(events: list[dict]) -> list[dict]:
    """Each step's wall, GPU-busy time and kernels (those starting within it)."""
    steps = _spans(events, lambda e: e.get("cat") == "user_annotation"
                   and e["name"].startswith("step"))
    kernels = _spans(events, lambda e: e.get("cat") == "kernel")
    calls = _spans(events, lambda e: e.get("cat") in ("cuda_runtime", "cuda_driver"))
    k_at, c_at = [k[0] for k in kernels], [c[0] for c in calls]
    out = []
    for start, end, name in steps:
        busy, span, time_of, count_of = 0.0, None, collections.Counter(), collections.Counter()
        i = bisect.bisect_left(k_at, start)
        while i < len(kernels) and kernels[i][0] < end:
            a, b, kernel = kernels[i]
            time_of[kernel[:70]] += b - a
            count_of[kernel[:70]] += 1
            if span is None or a > span[1]:
                busy += 0 if span is None else span[1] - span[0]
                span = [a, b]
            else:
                span[1] = max(span[1], b)
            i += 1
        busy += 0 if span is None else span[1] - span[0]
        api = collections.Counter()
        j = bisect.bisect_left(c_at, start)
        while j < len(calls) and calls[j][0] < end:
            api[calls[j][2]] += calls[j][1] - calls[j][0]
            j += 1
        out.append({"step": name, "wall_ms": (end - start) / 1e3, "busy_ms": busy / 1e3,
                    "kernels": time_of, "counts": count_of, "api": api})
    return out


def report(steps: list[dict]) -> None:
    for s in steps:
        print(f"{s['step']} wall {s['wall_ms']:.2f} ms gpu_busy {s['busy_ms']:.2f} "
              f"kernels {sum(s['counts'].values())}")
    decode = steps[20:-4]  # past the prompt steps, before the batch drains
    m = max(1, len(decode))
    time_of, count_of, api = collections.Counter(), collections.Counter(), collections.Counter()
    for s in decode:
        time_of.update(s["kernels"])
        count_of.update(s["counts"])
        api.update(s["api"])
    print(f"== decode steps {len(decode)}: wall {sum(s['wall_ms'] for s in decode) / m:.3f} ms, "
          f"GPU busy {sum(s['busy_ms'] for s in decode) / m:.3f} ms")
    print("-- kernels: ms a step, launches a step")
    for kernel, t in time_of.most_common(22):
        print(f"{t / m / 1e3:8.3f} {count_of[kernel] / m:6.1f} {kernel}")
    print("-- CUDA API: ms a step")
    for call, t in api.most_common(15):
        print(f"{t / m / 1e3:8.3f} {call}")
    for s in steps[:8]:
        print(f"== {s['step']} wall {s['wall_ms']:.2f} ms gpu_busy {s['busy_ms']:.2f}")
        for kernel, t in s["kernels"].most_common(14):
            print(f"     {t / 1e3:8.3f} {s['counts'][kernel]:5d} {kernel}")


def _rows(text: str) -> int:
    n = int(text)
    if not 1 <= n <= 4096:
        raise argparse.ArgumentTypeError(f"--n takes 1 to 4096 requests, not {n}")
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-8b", choices=sorted(SHAPES),
                    help="a bench/synthetic.py shape")
    ap.add_argument("--n", type=_rows, default=256, help="requests (rows)")
    args = ap.parse_args()
    report(traced_steps(args.model, args.n))


if __name__ == "__main__":
    main()
