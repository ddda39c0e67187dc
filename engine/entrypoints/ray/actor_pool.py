"""The engine actors of a batch-file job, fed as a stream, and the driver's
account of which lines each one holds.

Each actor keeps its engine's batch full. Its calls are queued
`calls_per_actor` deep, so it starts the next call (whose new lines join
the running batch) the moment one ends, and each call returns what finished
within `seconds`. How many new lines an actor gets follows its engine, not
a fixed chunk size: first `first_fill` (max_num_seqs, or an even share of
a smaller job), which its engine admits as far as its KV memory allows; then
enough to keep a queue in its engine beyond the lines it runs: what it
finishes in `calls_per_actor` calls (new lines wait that long behind the
queued calls), at least `reserve`. So no batch drains before the input does,
and no actor sits on a long queue at the end while another one idles.

Exactly once: the driver remembers every line it sent to an actor until
that line's record comes back (`held`). A record is handed on only for a
line still held, and only once. A restarted actor (Ray restarts a killed
one) is recognised by its new incarnation, and everything it held is sent
to it again; a line sent twice is answered at most twice and written once.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from engine.entrypoints.ray.cluster import actor_resources
from engine.entrypoints.ray.engine_worker import EngineWorker, Pumped, WorkerConfig

# An actor restarted more often than this is failing on its input, not being
# killed: the job stops (a re-run resumes it).
MAX_ACTOR_RESTARTS = 4
# How long a call runs the engine before returning what finished: records
# reach the output, and actors are topped up, about this often.
PUMP_SECONDS = 0.5


class _RayWorker(EngineWorker):
    def where(self) -> tuple[str, int, str]:
        """(host, pid, incarnation)."""
        return socket.gethostname(), os.getpid(), self.incarnation


class ActorPool:
    """`workers` engine actors of `config` on a connected Ray."""

    def __init__(self, ray, config: WorkerConfig, workers: int, cpus_per_worker: int,
                 first_fill: int, calls_per_actor: int = 2, seconds: float = PUMP_SECONDS):
        remote = ray.remote(max_restarts=MAX_ACTOR_RESTARTS,
                            max_task_retries=MAX_ACTOR_RESTARTS)(_RayWorker)
        options = actor_resources(cpus_per_worker)
        self.ray = ray
        self.actors = [remote.options(**options).remote(config) for _ in range(workers)]
        self.calls_per_actor, self.seconds = calls_per_actor, seconds
        self.first_fill = max(1, first_fill)
        self.reserve = max(4, config.max_num_seqs // 8)
        self.held: list[dict[int, bytes]] = [{} for _ in self.actors]  # line -> raw line
        self.calls: dict[Any, tuple[int, int]] = {}  # object ref -> (actor, new lines in it)
        self._calls = [0] * workers                          # in flight, per actor
        self._queued = [0] * workers                         # new lines in those calls
        self._waiting: list[int | None] = [None] * workers  # as last reported
        self._finished = [0] * workers                       # in its last call
        self._incarnation: list[str | None] = [None] * workers
        self._resend = [False] * workers

    def where(self) -> list[tuple[str, int]]:
        """(host, pid) of each actor, once each has started."""
        found = self.ray.get([a.where.remote() for a in self.actors])
        for i, (_, _, incarnation) in enumerate(found):
            self._incarnation[i] = incarnation
        return [(host, pid) for host, pid, _ in found]

    def room(self, i: int) -> int:
        """How many new lines actor `i` should get now."""
        if self._calls[i] >= self.calls_per_actor:
            return 0
        if self._waiting[i] is None:  # no report yet: fill the first batch
            return max(0, self.first_fill - len(self.held[i]))
        # Lines in calls still queued were not in the engine when it reported;
        # an actor holding nothing has nothing queued (whatever it said last).
        waiting = self._waiting[i] if self.held[i] else 0
        queue = max(self.reserve, self.calls_per_actor * self._finished[i])
        return max(0, queue - waiting - self._queued[i])

    def wants_call(self, i: int) -> bool:
        """Whether actor `i` holds lines and has room for another call."""
        return bool(self.held[i]) and self._calls[i] < self.calls_per_actor

    def send(self, i: int, lines: list[tuple[int, bytes]]) -> None:
        """Give actor `i` `lines` (and, after a restart, all it held before)."""
        payload = lines
        if self._resend[i]:
            payload = list(self.held[i].items()) + lines
            self._resend[i] = False
        self.held[i].update(lines)
        self.calls[self.actors[i].pump.remote(payload, self.seconds)] = (i, len(lines))
        self._calls[i] += 1
        self._queued[i] += len(lines)

    def next_done(self) -> tuple[list[int], list[bytes]]:
        """Wait for calls to return: the actors whose calls did, and the
        records that came back, each for a line still held (then held no
        more). Every call ready by then is taken (one pass, however many
        actors there are)."""
        first, rest = self.ray.wait(list(self.calls), num_returns=1)
        ready = first + (self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
                         if rest else [])
        returned, records = [], []
        for ref, pumped in zip(ready, self.ray.get(ready), strict=True):
            i, new = self.calls.pop(ref)
            self._calls[i] -= 1
            self._queued[i] -= new
            records += self._take(i, pumped)
            returned.append(i)
        return returned, records

    def _take(self, i: int, pumped: Pumped) -> list[bytes]:
        if pumped.incarnation != self._incarnation[i]:
            # Restarted: the lines the old actor held died with it.
            self._incarnation[i] = pumped.incarnation
            self._resend[i] = True
        held = self.held[i]
        records = [record for line, record in pumped.records if held.pop(line, None) is not None]
        self._waiting[i], self._finished[i] = pumped.waiting, len(records)
        return records

    def kill(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
