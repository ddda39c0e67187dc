"""An asyncio front end: many concurrent requests, one engine loop.

The engine steps on its own thread, so an event loop (an HTTP server, a
queue worker) never blocks on a forward pass. Commands reach the engine
through a thread-safe inbox; outputs go back to each request's asyncio.Queue
with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from engine.core.llm_engine import EngineArgs, LLMEngine
from engine.core.outputs import RequestOutput
from engine.core.sampling_params import SamplingParams


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLM:
    def __init__(self, model: str | None = None, *, engine: LLMEngine | None = None,
                 **engine_args: Any):
        self.engine = engine or LLMEngine.from_args(EngineArgs(model=model, **engine_args))
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._closed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="conveyor-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield deltas until the request finishes. Leaving the loop early
        (a client disconnects) aborts the request and frees its blocks."""
        if self._closed:
            raise RuntimeError("AsyncLLM is closed")
        request_id = request_id or f"async-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        if params is not None and params.structured_outputs is not None:
            # Compile the grammar here, off the engine thread (cached: the
            # serving layer usually did it already); a bad one fails this call.
            await loop.run_in_executor(None, self.engine.compile_grammar, params)
        stream = _Stream(loop)
        self._inbox.put(("add", request_id, prompt, params, stream))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._inbox.put(("abort", request_id))

    def num_pending(self) -> int:
        """Commands posted but not yet taken by the engine thread (new requests
        among them): with the scheduler's waiting queue, the load not yet admitted."""
        return self._inbox.qsize()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def close(self) -> None:
        self._closed = True
        self._inbox.put(("stop",))
        self._thread.join(timeout=30)

    # -- the engine thread ---------------------------------------------------
    def _run(self) -> None:
        while True:
            idle = not self.engine.has_unfinished()
            try:
                command = self._inbox.get(block=idle, timeout=None)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    self._abort_all(RuntimeError("engine stopped"))
                    return
                self._handle(command)
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.has_unfinished():
                self._step()

    def _handle(self, command) -> None:
        if command[0] == "add":
            _, request_id, prompt, params, stream = command
            try:
                self.engine.add_request(prompt, params, request_id=request_id)
            except Exception as exc:  # a bad request fails alone
                stream.put(exc)
                return
            self._streams[request_id] = stream
        elif command[0] == "abort":
            self._streams.pop(command[1], None)
            self.engine.abort_request(command[1])

    def _step(self) -> None:
        try:
            touched = self.engine.step()
        except Exception as exc:  # every in-flight request fails with the error
            self.error = exc
            self._abort_all(exc)
            return
        for request in touched:
            stream = self._streams.get(request.request_id)
            if stream is None:
                continue
            out = request.output(delta=True)
            if out.outputs[0].text or out.outputs[0].token_ids or out.finished:
                stream.put(out)
            if request.finished:
                self._streams.pop(request.request_id, None)

    def _abort_all(self, exc: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            stream.put(exc)
        self._streams.clear()
