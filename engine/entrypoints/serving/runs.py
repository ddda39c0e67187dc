"""Prepared generation requests on a synchronous LLMEngine, for the entry
points that step the engine themselves (batch files, queue jobs): every
choice of a request is added or none is, and a request comes back once its
last choice has finished."""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from engine.core.outputs import RequestOutput
from engine.entrypoints.serving.errors import as_serving_error
from engine.entrypoints.serving.generation import PreparedGeneration


@dataclass
class _Run:
    prepared: PreparedGeneration
    request_ids: list[str]
    outputs: list[RequestOutput | None]
    remaining: int


class GenerationRuns:
    """The requests in flight on `engine`, each under the caller's key."""

    def __init__(self, engine: Any):
        self.engine = engine
        self._runs: dict[Hashable, _Run] = {}
        self._owner: dict[str, tuple[Hashable, int]] = {}  # engine request id -> (key, choice)
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._runs

    @property
    def num_sequences(self) -> int:
        """Engine requests (choices) not yet finished."""
        return len(self._owner)

    def submit(self, key: Hashable, prepared: PreparedGeneration) -> None:
        """Add every choice of `prepared` to the engine; on a refusal none
        stays and a ServingError is raised."""
        if key in self._runs:
            raise ValueError(f"key {key!r} is already running")
        run = _Run(prepared, [], [None] * len(prepared.inputs), len(prepared.inputs))
        try:
            for choice, item in enumerate(prepared.inputs):
                rid = f"run{next(self._ids)}.{choice}"
                self.engine.add_request(item.prompt, item.params, request_id=rid)
                run.request_ids.append(rid)
                self._owner[rid] = (key, choice)
        except Exception as exc:
            for rid in run.request_ids:
                self.engine.abort_request(rid)
                self._owner.pop(rid, None)
            raise as_serving_error(exc) from None
        self._runs[key] = run

    def step(self) -> list[tuple[Hashable, PreparedGeneration, list[RequestOutput]]]:
        """One engine step; the requests it finished, as (key, prepared,
        outputs in choice order). If the step raises, every run is aborted
        (the engine may have done it already) and forgotten, and the error
        propagates."""
        try:
            touched = self.engine.step()
        except BaseException:
            self.abort_all()
            raise
        done = []
        for request in touched:
            if not request.finished or request.request_id not in self._owner:
                continue
            key, choice = self._owner.pop(request.request_id)
            run = self._runs[key]
            run.outputs[choice] = request.output(delta=False)
            run.remaining -= 1
            if run.remaining == 0:
                del self._runs[key]
                done.append((key, run.prepared, run.outputs))
        return done

    def abort(self, key: Hashable) -> None:
        run = self._runs.pop(key, None)
        for rid in run.request_ids if run else ():
            if self._owner.pop(rid, None) is not None:
                self.engine.abort_request(rid)

    def abort_all(self) -> None:
        for key in list(self._runs):
            self.abort(key)
