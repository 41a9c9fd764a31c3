"""Cancelling work whose client has gone.

A scoring request can queue behind thousands of pairs. If its client disconnects, the work is
wasted and delays everyone else, so the handler's coroutine is raced against the connection's
`http.disconnect`: when the client leaves first the coroutine is cancelled, and the batcher drops
the request's pairs before they reach the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from service import metrics

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        metrics.REQUESTS_REJECTED.labels(reason="client_disconnected").inc()
        raise ClientDisconnected
    return task.result()
