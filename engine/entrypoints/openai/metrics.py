"""Server metrics in Prometheus' text exposition format (version 0.0.4).

A few counters and histograms are kept by the server as requests come and
go; the engine's own numbers (running, waiting, KV blocks, tokens,
preemptions) are read from `LLMEngine.stats()` at scrape time, so they are
never stale and cost nothing between scrapes.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets in seconds: a tiny model on a CPU answers in milliseconds, a
# loaded GPU server in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)

# tokens/s is the rate of the generated-token counter over this window.
RATE_WINDOW_S = 10.0


class Histogram:
    """Cumulative-bucket histogram, as Prometheus expects it."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        """Exposition lines; `labels` ('a="x"') go on every sample."""
        out, running = [], 0
        tail = f"{{{labels}}}" if labels else ""
        for bound, n in zip((*self.buckets, math.inf), self.counts):
            running += n
            le = f'le="{_number(bound)}"'
            out.append(f"{name}_bucket{{{labels + ',' if labels else ''}{le}}} {running}")
        out.append(f"{name}_sum{tail} {_number(self.sum)}")
        out.append(f"{name}_count{tail} {self.count}")
        return out


class TokenRate:
    """Generated tokens per second over the last RATE_WINDOW_S seconds, from
    samples of a monotonically growing counter."""

    def __init__(self, window: float = RATE_WINDOW_S):
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def sample(self, total: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self.samples.append((now, total))
        # Keep one sample at or before the window's start so the rate covers it.
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()
        t0, n0 = self.samples[0]
        return (total - n0) / (now - t0) if now > t0 else 0.0


class ServerMetrics:
    """What the server counts itself; `render(stats)` adds the engine's.
    Each number is exposed under Conveyor's name and, where vLLM has one,
    under vLLM's too (labelled with `model_name`), so vLLM's Grafana
    dashboards work against Conveyor unchanged."""

    def __init__(self, model_name: str = "default"):
        self.model_name = model_name
        self.time_to_first_token = Histogram()
        self.e2e_latency = Histogram()
        self.requests: dict[tuple[str, int], int] = {}   # (route, status) -> count
        self.finished: dict[str, int] = {}               # finish reason -> count
        self.client_aborts = 0     # requests aborted because their client went away
        self.rejected_overload = 0
        self.embedding_requests = 0
        self.rate = TokenRate()

    def count_request(self, route: str, status: int) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def count_finished(self, reason: str, ttft: float | None, e2e: float | None) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1
        if ttft is not None:
            self.time_to_first_token.observe(ttft)
        if e2e is not None:
            self.e2e_latency.observe(e2e)

    def sample_rate(self, stats) -> float:
        return self.rate.sample(stats.generated_tokens)

    def render(self, stats=None) -> str:
        """The exposition text. `stats` is an `EngineStats` (None: no
        generation model is served)."""
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, lines: list[str]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)

        if stats is not None:
            gauge_rows = [
                ("conveyor_requests_running", "Requests in the running batch.", stats.running),
                ("conveyor_requests_waiting", "Requests queued for admission.", stats.waiting),
                ("conveyor_kv_blocks_used", "KV-cache blocks in use.", stats.kv_blocks_used),
                ("conveyor_kv_blocks_total", "KV-cache blocks in the pool.",
                 stats.kv_blocks_total),
                ("conveyor_kv_blocks_peak", "Most KV-cache blocks ever in use.",
                 stats.kv_blocks_peak),
                ("conveyor_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.",
                 stats.kv_blocks_used / max(1, stats.kv_blocks_total)),
                ("conveyor_generation_tokens_per_second",
                 f"Generated tokens per second over the last {RATE_WINDOW_S:g} s.",
                 self.sample_rate(stats)),
            ]
            for name, help_text, value in gauge_rows:
                metric(name, "gauge", help_text, [f"{name} {_number(value)}"])
            counter_rows = [
                ("conveyor_generation_tokens_total", "Tokens generated.", stats.generated_tokens),
                ("conveyor_prompt_tokens_total", "Prompt tokens received.", stats.prompt_tokens),
                ("conveyor_preemptions_total", "Sequences preempted for lack of KV blocks.",
                 stats.preemptions),
                ("conveyor_engine_steps_total", "Engine steps run.", stats.steps),
            ]
            for name, help_text, value in counter_rows:
                metric(name, "counter", help_text, [f"{name} {_number(value)}"])
        self._render_vllm(metric, stats)
        metric("conveyor_time_to_first_token_seconds", "histogram",
               "Time from arrival to the first generated token.",
               self.time_to_first_token.lines("conveyor_time_to_first_token_seconds"))
        metric("conveyor_e2e_request_latency_seconds", "histogram",
               "Time from arrival to the last token.",
               self.e2e_latency.lines("conveyor_e2e_request_latency_seconds"))
        metric("conveyor_requests_finished_total", "counter",
               "Generation requests finished, by finish reason.",
               [f'conveyor_requests_finished_total{{reason="{_label(r)}"}} {n}'
                for r, n in sorted(self.finished.items())])
        metric("conveyor_client_aborts_total", "counter",
               "Requests aborted because the client disconnected.",
               [f"conveyor_client_aborts_total {self.client_aborts}"])
        metric("conveyor_rejected_overload_total", "counter",
               "Requests refused because the waiting queue was full.",
               [f"conveyor_rejected_overload_total {self.rejected_overload}"])
        metric("conveyor_embedding_requests_total", "counter", "Embedding requests served.",
               [f"conveyor_embedding_requests_total {self.embedding_requests}"])
        metric("conveyor_http_requests_total", "counter", "HTTP requests by route and status.",
               [f'conveyor_http_requests_total{{route="{_label(r)}",status="{s}"}} {n}'
                for (r, s), n in sorted(self.requests.items())])
        return "\n".join(out) + "\n"

    def _render_vllm(self, metric, stats) -> None:
        """vLLM's names, units and `model_name` label for the same numbers."""
        label = f'model_name="{_label(self.model_name)}"'
        if stats is not None:
            usage = stats.kv_blocks_used / max(1, stats.kv_blocks_total)
            rows = [
                ("vllm:num_requests_running", "gauge", "Requests in the running batch.",
                 stats.running),
                ("vllm:num_requests_waiting", "gauge", "Requests queued for admission.",
                 stats.waiting),
                ("vllm:gpu_cache_usage_perc", "gauge",
                 "KV-cache usage, 0 to 1 (vLLM's older name).", usage),
                ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage, 0 to 1.", usage),
                ("vllm:num_preemptions_total", "counter",
                 "Sequences preempted for lack of KV blocks.", stats.preemptions),
                ("vllm:prompt_tokens_total", "counter", "Prompt tokens received.",
                 stats.prompt_tokens),
                ("vllm:generation_tokens_total", "counter", "Tokens generated.",
                 stats.generated_tokens),
                ("vllm:prefix_cache_queries_total", "counter",
                 "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries),
                ("vllm:prefix_cache_hits_total", "counter",
                 "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits),
            ]
            for name, kind, help_text, value in rows:
                metric(name, kind, help_text, [f"{name}{{{label}}} {_number(value)}"])
        metric("vllm:time_to_first_token_seconds", "histogram",
               "Time from arrival to the first generated token.",
               self.time_to_first_token.lines("vllm:time_to_first_token_seconds", label))
        metric("vllm:e2e_request_latency_seconds", "histogram",
               "Time from arrival to the last token.",
               self.e2e_latency.lines("vllm:e2e_request_latency_seconds", label))
        metric("vllm:request_success_total", "counter", "Requests finished, by finish reason.",
               [f'vllm:request_success_total{{{label},finished_reason="{_label(r)}"}} {n}'
                for r, n in sorted(self.finished.items())])


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse_samples(text: str) -> dict[str, float]:
    """Sample name (with its labels) -> value, from exposition text: enough
    for tests and scripts to read /metrics without a Prometheus client."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
