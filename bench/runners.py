"""Run a workload through Conveyor or a peer and time it the same way."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np

from bench.workloads import Workload


@dataclass
class Result:
    engine: str
    workload: str
    requests: int
    prompt_tokens: int
    output_tokens: int
    seconds: float
    peak_memory_gb: float
    extra: dict = field(default_factory=dict)

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tps(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds

    def as_dict(self) -> dict:
        return {**asdict(self), "output_tok_s": round(self.output_tps, 1),
                "total_tok_s": round(self.total_tps, 1)}


def _reset_peak() -> None:
    mx.synchronize()
    mx.reset_peak_memory()


def _peak_gb() -> float:
    return mx.get_peak_memory() / 1e9


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}


def run_conveyor(engine, workload: Workload, on_step=None) -> Result:
    """All requests arrive at t=0; greedy; EOS ignored; token ids only."""
    from engine.sampling_params import SamplingParams

    _reset_peak()
    start = time.perf_counter()
    requests = [engine.add_request(p, SamplingParams(
        temperature=0, max_tokens=n, ignore_eos=True, detokenize=False))
        for p, n in zip(workload.prompts, workload.output_lens)]
    steps0 = engine.stats().steps
    while engine.has_unfinished():
        engine.step()
        if on_step:
            on_step()
    seconds = time.perf_counter() - start
    out = sum(r.sequence.num_output_tokens for r in requests)
    stats = engine.stats()
    block_bytes = engine.cache.nbytes // (engine.cache.num_blocks + 1)
    ttft = [r.metrics.time_to_first_token for r in requests]
    e2e = [r.metrics.e2e_latency for r in requests]
    tpot = [(r.metrics.finished_time - r.metrics.first_token_time)
            / max(1, r.sequence.num_output_tokens - 1) for r in requests]
    return Result("conveyor", workload.name, len(requests), workload.num_prompt_tokens, out,
                  seconds, _peak_gb(), {
                      "steps": stats.steps - steps0, "preemptions": stats.preemptions,
                      "kv_bytes_allocated": engine.cache.nbytes,
                      "kv_bytes_peak_used": stats.kv_blocks_peak * block_bytes,
                      "kv_bytes_needed_at_peak": _tokens_at_peak(workload) * block_bytes
                      // engine.cache.block_size,
                      "padding_waste": round(stats.padding_waste, 4),
                      "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
                      "e2e_s": percentiles(e2e)})


def _tokens_at_peak(workload: Workload) -> int:
    # Upper bound: every sequence at full length at once.
    return sum(len(p) + n for p, n in zip(workload.prompts, workload.output_lens))


def run_mlx_lm(model, workload: Workload, batch_size: int) -> Result:
    """mlx-lm's continuous batching (BatchGenerator) on the same prompts."""
    from mlx_lm.generate import BatchGenerator

    _reset_peak()
    start = time.perf_counter()
    gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=batch_size,
                         prefill_batch_size=min(batch_size, 8))
    gen.insert(workload.prompts, max_tokens=list(workload.output_lens))
    remaining, out = len(workload.prompts), 0
    while remaining:
        for response in gen.next_generated():
            out += 1
            if response.finish_reason is not None:
                remaining -= 1
    seconds = time.perf_counter() - start
    gen.close()
    return Result("mlx-lm", workload.name, len(workload.prompts), workload.num_prompt_tokens,
                  out, seconds, _peak_gb())
