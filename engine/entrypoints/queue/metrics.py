"""The queue worker's counters and the group's backlog, for its log line
and Prometheus."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from engine.entrypoints.queue.jobs import text


@dataclass
class WorkerMetrics:
    """Counters of this worker and the group's backlog, for the log line and
    Prometheus. `pending` and lag are sampled from Redis every log interval."""

    consumer: str = ""
    ok: int = 0           # results written with status 200
    refused: int = 0      # results written with an error body (status 400)
    duplicate: int = 0    # jobs whose id already had a result: acked, not rewritten
    failed: int = 0       # attempts that failed; the job stays pending for a retry
    dead: int = 0         # jobs moved to the dead-letter stream
    claimed: int = 0      # entries taken over from idle consumers
    batches: int = 0
    in_flight: int = 0
    pending: int = 0      # the group's pending entries (all consumers)
    lag_entries: int | None = None  # entries not yet delivered (Redis >= 7 reports it)
    lag_seconds: float = 0.0        # age of the oldest entry not yet delivered
    jobs_per_second: float = 0.0
    _window_start: float = 0.0
    _window_jobs: int = 0

    @property
    def finished(self) -> int:
        return self.ok + self.refused + self.duplicate + self.dead

    def update_rate(self, now: float) -> None:
        if self._window_start:
            span = now - self._window_start
            if span > 0:
                self.jobs_per_second = (self.finished - self._window_jobs) / span
        self._window_start, self._window_jobs = now, self.finished

    def log_line(self) -> str:
        lag = "" if self.lag_entries is None else f"{self.lag_entries} entries, "
        return (f"worker {self.consumer}: {self.finished} jobs done ({self.ok} ok, "
                f"{self.refused} refused, {self.duplicate} duplicate, {self.dead} dead; "
                f"{self.failed} failed attempts), {self.jobs_per_second:.1f} jobs/s, "
                f"in flight {self.in_flight}, pending {self.pending}, "
                f"lag {lag}{self.lag_seconds:.1f} s")

    def prometheus(self) -> str:
        """The Prometheus text exposition of these metrics."""
        label = f'consumer="{self.consumer}"'
        lines = ["# HELP conveyor_worker_jobs_total Jobs ended by this worker, by outcome.",
                 "# TYPE conveyor_worker_jobs_total counter"]
        for outcome in ("ok", "refused", "duplicate", "dead"):
            lines.append(f'conveyor_worker_jobs_total{{{label},outcome="{outcome}"}} '
                         f"{getattr(self, outcome)}")
        gauges = [
            ("failed_attempts_total", "counter", "Job attempts that failed (retried later).",
             self.failed),
            ("claimed_total", "counter", "Entries claimed from idle consumers.", self.claimed),
            ("batches_total", "counter", "Batches run.", self.batches),
            ("jobs_per_second", "gauge", "Jobs ended per second over the last interval.",
             self.jobs_per_second),
            ("in_flight", "gauge", "Jobs read by this worker and not yet acked.",
             self.in_flight),
            ("pending", "gauge", "Entries pending in the consumer group.", self.pending),
            ("lag_seconds", "gauge", "Age of the oldest entry not yet delivered.",
             self.lag_seconds),
        ]
        if self.lag_entries is not None:
            gauges.append(("lag_entries", "gauge", "Entries not yet delivered to the group.",
                           self.lag_entries))
        for name, kind, help_text, value in gauges:
            lines += [f"# HELP conveyor_worker_{name} {help_text}",
                      f"# TYPE conveyor_worker_{name} {kind}",
                      f"conveyor_worker_{name}{{{label}}} {value}"]
        return "\n".join(lines) + "\n"


def group_lag(redis: Any, stream: str, group: str) -> tuple[int | None, float]:
    """The group's backlog: entries not yet delivered (None where Redis < 7
    does not say) and the age in seconds of the oldest of them."""
    info = next((g for g in redis.xinfo_groups(stream) if text(g["name"]) == group), None)
    if info is None:
        return None, 0.0
    lag = info.get("lag")
    last = text(info["last-delivered-id"])
    first = redis.xrange(stream, min=f"({last}", max="+", count=1)
    if not first:
        return (int(lag) if lag is not None else 0), 0.0
    millis = int(text(first[0][0]).split("-")[0])
    return (int(lag) if lag is not None else None), max(0.0, time.time() - millis / 1000)
