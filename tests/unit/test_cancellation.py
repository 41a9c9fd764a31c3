"""cancel_on_disconnect: the work is cancelled when the client leaves first."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from service.cancellation import ClientDisconnected, cancel_on_disconnect


def _request(messages: asyncio.Queue[dict[str, object]]) -> Request:
    async def receive() -> dict[str, object]:
        return await messages.get()

    return Request({"type": "http", "method": "POST", "headers": []}, receive)


async def test_result_when_the_client_stays() -> None:
    queue: asyncio.Queue[dict[str, object]] = asyncio.Queue()

    async def work() -> int:
        await asyncio.sleep(0.01)
        return 42

    assert await cancel_on_disconnect(_request(queue), work()) == 42


async def test_disconnect_cancels_the_work() -> None:
    queue: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    cancelled = asyncio.Event()

    async def work() -> int:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    async def leave() -> None:
        await asyncio.sleep(0.05)
        await queue.put({"type": "http.disconnect"})

    leaving = asyncio.create_task(leave())
    with pytest.raises(ClientDisconnected):
        await cancel_on_disconnect(_request(queue), work())
    await leaving
    await asyncio.wait_for(cancelled.wait(), 1)
