"""The host's share of a GPU decode step, measured on the CPU.

On a GPU a 1B model's decode step at 256 rows is bound by the Python around
the forward (bench/gpu_profile.py --engine 1b:256), not by the device. This
runs the engine's real step loop as it runs on CUDA (asynchronous scheduling,
compiled decode batches, the CUDA backend's metadata) with the forward
replaced by a stub that returns logits at once, and times each host phase:

    PYTHONPATH=$PWD python -m bench.host_step [--rows 256,64] [--repeat 5]
                                              [--steps 32] [--profile]

Phases are exclusive (a phase's time excludes the phases called inside it):
schedule, prepare (the compiled-decode batch, less the metadata), metadata
(CudaAttention.build), sample (graph building), plan_results, resolve,
launch_rows (the rest of LLMEngine._launch: per-row sampling inputs),
collect (the rest of LLMEngine._collect: per-request bookkeeping), other
(LLMEngine.step's own). MLX evaluation (the stub's logits, the sampler, which
the device does on a GPU) is left out. Each figure is the best of --repeat
runs of --steps decode steps (contexts ~176 to ~208 tokens), in microseconds
per step. --profile prints cProfile's hottest functions over one run.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import defaultdict

import mlx.core as mx
import numpy as np

import engine  # noqa: F401  (the platform bootstrap)
from bench.synthetic import NullTokenizer
from engine.core import llm_engine
from engine.core.llm_engine import EngineArgs, LLMEngine
from engine.core.sampling_params import SamplingParams
from engine.platform.base import Platform
from kvcache.attention.cuda import CudaAttention

VOCAB = 4096
PROMPT = 128
CONFIG = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
          "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
          "head_dim": 16, "rms_norm_eps": 1e-5, "vocab_size": VOCAB,
          "max_position_embeddings": 4096, "rope_theta": 10000.0,
          "tie_word_embeddings": True}
PHASES = ("schedule", "prepare", "metadata", "sample", "plan_results", "resolve",
          "launch_rows", "collect", "other")


class CudaLikePlatform(Platform):
    """What the engine does on CUDA, minus the device: compiled decode steps,
    asynchronous scheduling and the CUDA backend's metadata."""

    name = "cuda-like (host benchmark)"
    max_num_batched_tokens = 8192
    compile_decode = True
    async_scheduling = True

    def fast_attention(self, spec):
        return CudaAttention(spec), None


class Clock:
    """Exclusive host seconds per phase: a wrapped call's time counts to its
    phase and is taken off the phase of the wrapped call around it."""

    def __init__(self):
        self.total: dict[str, float] = defaultdict(float)
        self._stack: list[str] = []
        self.on = False

    def timed(self, fn, phase: str):
        def call(*a, **k):
            if not self.on:
                return fn(*a, **k)
            self._stack.append(phase)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t
                self._stack.pop()
                self.total[phase] += dt
                if self._stack:
                    self.total[self._stack[-1]] -= dt
        return call

    def wrap(self, obj, attr: str, phase: str) -> None:
        setattr(obj, attr, self.timed(getattr(obj, attr), phase))


class TimedMx:
    """mlx.core as llm_engine sees it, with evaluation timed apart."""

    def __init__(self, clock: Clock):
        self.eval = clock.timed(mx.eval, "mlx_eval")
        self.async_eval = clock.timed(mx.async_eval, "mlx_eval")

    def __getattr__(self, name):
        return getattr(mx, name)


def stub_forward(runner):
    """Logits at once: row r of a fixed random table picked by the token id,
    so the sampled ids depend on the (in-flight) inputs as a model's would."""
    table = mx.array(np.random.default_rng(0).normal(size=(VOCAB, VOCAB)).astype(np.float32))
    mx.eval(table)

    def forward(batch):
        n = batch.num_tokens if batch.compiled else len(batch.logits_index)
        ids = batch.input_ids[:n] if batch.compiled else batch.input_ids[batch.logits_index]
        return table[ids % VOCAB]
    runner.forward = forward


def _bytes_per_block() -> int:
    from kvcache.paged_cache import PagedKVCache
    return PagedKVCache.bytes_per_block(CONFIG["num_hidden_layers"], 16,
                                        CONFIG["num_key_value_heads"], CONFIG["head_dim"],
                                        mx.float32)


def new_engine(rows: int) -> LLMEngine:
    from models.llama import Model, ModelArgs

    model = Model(ModelArgs.from_dict(CONFIG))
    args = EngineArgs(kv_cache_bytes=16384 * _bytes_per_block(), max_num_seqs=256)
    eng = LLMEngine(model, NullTokenizer(), CONFIG, args, CudaLikePlatform(mx.cpu))
    assert eng.async_scheduling and eng.runner._compiled is not None
    stub_forward(eng.runner)
    prompts = np.random.default_rng(rows).integers(0, VOCAB, size=(rows, PROMPT)).tolist()
    for p in prompts:
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=1024, ignore_eos=True,
                                          detokenize=False))
    return eng


def warm_up(eng: LLMEngine, context: int) -> None:
    """Prefill every prompt and decode until each sequence holds `context` tokens."""
    while min((s.num_tokens for s in eng.scheduler.running), default=0) < context \
            or eng.scheduler.waiting:
        eng.step()


def instrument(eng: LLMEngine, clock: Clock) -> None:
    clock.wrap(eng, "step", "other")
    clock.wrap(eng, "_launch", "launch_rows")
    clock.wrap(eng, "_collect", "collect")
    clock.wrap(eng.scheduler, "schedule", "schedule")
    clock.wrap(eng.scheduler, "plan_results", "plan_results")
    clock.wrap(eng.scheduler, "resolve", "resolve")
    clock.wrap(eng.runner, "prepare", "prepare")
    clock.wrap(eng.runner, "forward", "forward_stub")
    clock.wrap(eng.runner.backend, "build", "metadata")
    llm_engine.sample = clock.timed(llm_engine.sample, "sample")
    llm_engine.mx = TimedMx(clock)


def run_once(rows: int, steps: int, profile: cProfile.Profile | None = None) -> dict:
    """Microseconds per decode step in each phase over `steps` steps."""
    real_sample, real_mx = llm_engine.sample, llm_engine.mx
    eng = new_engine(rows)
    clock = Clock()
    try:
        instrument(eng, clock)
        warm_up(eng, 176)
        clock.on = True
        if profile:
            profile.enable()
        for _ in range(steps):
            eng.step()
        if profile:
            profile.disable()
        clock.on = False
    finally:
        llm_engine.sample, llm_engine.mx = real_sample, real_mx
    for rid in list(eng.requests):
        eng.abort_request(rid)
    return {k: v / steps * 1e6 for k, v in clock.total.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="256,64")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--profile", action="store_true", help="cProfile one run per row count")
    args = ap.parse_args()
    for rows in (int(r) for r in args.rows.split(",")):
        runs = [run_once(rows, args.steps) for _ in range(args.repeat)]
        best = {k: min(r.get(k, 0.0) for r in runs) for k in PHASES}
        ours = sum(best.values())
        print(f"rows={rows} (best of {args.repeat} x {args.steps} steps, us/step)")
        for k in PHASES:
            print(f"  {k:13s} {best[k]:8.0f}")
        print(f"  {'total (ours)':13s} {ours:8.0f}   "
              f"[mlx eval, not counted: {min(r['mlx_eval'] for r in runs):.0f}]")
        if args.profile:
            prof = cProfile.Profile()
            run_once(rows, args.steps, prof)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
