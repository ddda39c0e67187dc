"""Streaming and disconnects for the HTTP server: server-sent events that
abort their engine requests when the client goes away, and the merge of
several engine streams (one a choice) into one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

import msgspec
from starlette.requests import Request

from engine.core.outputs import RequestOutput

log = logging.getLogger("conveyor.server")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def sse(event: msgspec.Struct) -> bytes:
    return b"data: " + msgspec.json.encode(event) + b"\n\n"


class EventStream:
    """A server-sent-events response that closes its event source as soon as
    the client disconnects (or a write to it fails), so the engine requests
    behind it are aborted at once rather than when the next token is ready."""

    def __init__(self, events: AsyncIterator[bytes], on_disconnect: Callable[[], None]):
        self.events = events
        self.on_disconnect = on_disconnect
        self.status_code = 200

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})

        async def pump() -> None:
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        writer = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if writer.done() and not writer.cancelled():
                error = writer.exception()
                if error is not None and not isinstance(error, OSError):
                    log.error("streaming failed", exc_info=error)
            if not writer.done() or isinstance(writer.exception(), OSError):
                self.on_disconnect()
        finally:
            for task in (writer, watcher):
                task.cancel()
            await asyncio.gather(writer, watcher, return_exceptions=True)
            await self.events.aclose()  # closes the engine streams: abort


async def _wait_disconnect(receive) -> None:
    # The body has been read, so the next message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable, on_disconnect):
    """Run `work`; if the client disconnects first, cancel it (aborting its
    engine requests) and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        on_disconnect()
        raise ClientGone()
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


async def merge(streams: list[AsyncIterator[RequestOutput]]
                ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, delta) from several engine streams as they come.
    Closing this iterator cancels every stream, which aborts its request."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for delta in only:
                yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((i, delta))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def accumulate(total: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """The whole output so far, from the previous total and a delta."""
    d = delta.outputs[0]
    if total is None:
        first = msgspec.structs.replace(
            d, token_ids=list(d.token_ids),
            logprobs=None if d.logprobs is None else list(d.logprobs))
        return msgspec.structs.replace(delta, outputs=[first])
    c = total.outputs[0]
    c.text += d.text
    c.token_ids.extend(d.token_ids)
    if d.logprobs is not None:
        c.logprobs = (c.logprobs or []) + d.logprobs
    c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
    total.finished, total.error, total.metrics = delta.finished, delta.error, delta.metrics
    return total
