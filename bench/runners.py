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

    @property
    def decode_tps(self) -> float | None:
        """Output tok/s once every request has its first token: the decode
        phase alone (what llama.cpp's batched-bench calls generation speed)."""
        phase = self.extra.get("decode_phase")
        return phase["tokens"] / phase["seconds"] if phase and phase["seconds"] > 0 else None

    def as_dict(self) -> dict:
        decode = self.decode_tps
        return {**asdict(self), "output_tok_s": round(self.output_tps, 1),
                "total_tok_s": round(self.total_tps, 1),
                "decode_tok_s": round(decode, 1) if decode else None}


class DecodePhase:
    """Marks the moment every request has produced a token, and counts the
    tokens and seconds after it."""

    def __init__(self, num_requests: int):
        self.num_requests = num_requests
        self.started: set = set()
        self.t0: float | None = None
        self.tokens = 0

    def saw(self, request_key, new_tokens: int = 1) -> None:
        if self.t0 is not None:
            self.tokens += new_tokens
            return
        self.started.add(request_key)
        if len(self.started) == self.num_requests:
            self.t0 = time.perf_counter()

    def result(self, end: float) -> dict | None:
        if self.t0 is None:
            return None
        return {"tokens": self.tokens, "seconds": end - self.t0}


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


def run_conveyor(engine, workload: Workload, on_step=None, keep_prefix_cache=False) -> Result:
    """All requests arrive at t=0; greedy; EOS ignored; token ids only. The
    prefix cache starts empty (a warm-up on the same prompts must not serve
    the timed run) unless `keep_prefix_cache`."""
    from engine.core.sampling_params import SamplingParams

    if not keep_prefix_cache:
        engine.reset_prefix_cache()
    stats0 = engine.stats()
    _reset_peak()
    start = time.perf_counter()
    requests = [engine.add_request(p, SamplingParams(
        temperature=0, max_tokens=n, ignore_eos=True, detokenize=False))
        for p, n in zip(workload.prompts, workload.output_lens)]
    steps0 = engine.stats().steps
    phase = DecodePhase(len(requests))
    counts = [0] * len(requests)
    while engine.has_unfinished():
        engine.step()
        for i, r in enumerate(requests):
            n = r.sequence.num_output_tokens
            if n > counts[i]:
                phase.saw(i, n - counts[i])
                counts[i] = n
        if on_step:
            on_step()
    end = time.perf_counter()
    seconds = end - start
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
                      "prefix_cache_hits": stats.prefix_cache_hits - stats0.prefix_cache_hits,
                      "prefix_cache_queries":
                          stats.prefix_cache_queries - stats0.prefix_cache_queries,
                      "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
                      "e2e_s": percentiles(e2e), "decode_phase": phase.result(end),
                      "path": describe_path(engine)})


def describe_path(engine) -> str:
    """Which forward and matmul Conveyor ran, for the report."""
    from engine.platform.int8_linear import Int8Embedding, Int8Linear

    packed = [m.packed for _, m in engine.model.named_modules()
              if isinstance(m, (Int8Linear, Int8Embedding))]
    forward = "C forward" if engine.runner.host_forward is not None else "MLX graph"
    if packed:
        weights = f"integer codes, {'int16' if packed[0].wide else 'int8'} activations"
    else:
        weights = "weights " + str(engine.model.model.norm.weight.dtype).split(".")[-1]
    kv = str(engine.cache.dtype).split(".")[-1]
    return f"{forward}, {weights}, K/V {kv}"


def _tokens_at_peak(workload: Workload) -> int:
    # Upper bound: every sequence at full length at once.
    return sum(len(p) + n for p, n in zip(workload.prompts, workload.output_lens))


def run_mlx_lm(model, workload: Workload, batch_size: int) -> Result:
    """mlx-lm's continuous batching (BatchGenerator) on the same prompts."""
    from mlx_lm.generate import BatchGenerator

    _reset_peak()
    start = time.perf_counter()
    # Tuned as its users tune it: prefill up to 64 prompts at once, not its default 8.
    gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=batch_size,
                         prefill_batch_size=min(batch_size, 64))
    gen.insert(workload.prompts, max_tokens=list(workload.output_lens))
    remaining, out = len(workload.prompts), 0
    phase = DecodePhase(len(workload.prompts))
    while remaining:
        for response in gen.next_generated():
            out += 1
            phase.saw(response.uid)
            if response.finish_reason is not None:
                remaining -= 1
    end = time.perf_counter()
    gen.close()
    return Result("mlx-lm", workload.name, len(workload.prompts), workload.num_prompt_tokens,
                  out, end - start, _peak_gb(), {"decode_phase": phase.result(end)})
