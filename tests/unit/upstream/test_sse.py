"""The SSE body of a streaming answer: keep-alives, framing, in-stream errors, cancellation."""

from __future__ import annotations

import asyncio
import json

from service.errors import envelope_for
from service.upstream.sse import KEEPALIVE, SSE_DONE, sse_stream
from tests.support.upstream import (
    SECRET,
    FakeUpstream,
    chat_request,
    fail_when,
    options,
    select,
    wait_for,
)


async def test_closing_the_stream_cancels_the_gathering(make_proxy):
    upstream = FakeUpstream(block=asyncio.Event())
    proxy = make_proxy(upstream, n_support="no")
    task = asyncio.create_task(select(proxy, chat_request(), options()))
    events = sse_stream(task, error_envelope=envelope_for, keepalive_s=0.01)
    assert await anext(events) == KEEPALIVE
    await wait_for(lambda: upstream.started == 17)
    await events.aclose()  # what the server does when the client goes away
    assert task.cancelled() and upstream.cancelled == 17


async def test_sse_stream_keeps_alive_then_streams_then_done(make_proxy):
    release = asyncio.Event()
    upstream = FakeUpstream(block=release)
    proxy = make_proxy(upstream, n_support="no")
    task = asyncio.create_task(select(proxy, chat_request(), options()))
    asyncio.get_running_loop().call_later(0.05, release.set)
    events = [
        e
        async for e in sse_stream(
            task, error_envelope=envelope_for, include_usage=True, keepalive_s=0.01
        )
    ]
    assert events[0] == KEEPALIVE and events[-1] == SSE_DONE
    data = [json.loads(e[len("data: ") :]) for e in events if e.startswith("data: {")]
    assert all(e in (KEEPALIVE, SSE_DONE) or e.startswith("data: {") for e in events)
    assert all(e.endswith("\n\n") for e in events)
    assert data[0]["object"] == "chat.completion.chunk"
    assert data[-1]["choices"] == [] and "usage" in data[-1]


async def test_sse_stream_reports_an_error_event(make_proxy):
    proxy = make_proxy(FakeUpstream(fail=fail_when(lambda _b: True)), n_support="no")
    task = asyncio.create_task(select(proxy, chat_request(), options()))
    events = [e async for e in sse_stream(task, error_envelope=envelope_for, keepalive_s=5)]
    assert events[-1] == SSE_DONE
    error = json.loads(events[-2][len("data: ") :])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "upstream_error"


async def test_sse_stream_hides_unknown_errors():
    async def broken() -> None:
        raise RuntimeError(f"internal detail {SECRET}")

    events = [
        e
        async for e in sse_stream(
            asyncio.ensure_future(broken()), error_envelope=envelope_for, keepalive_s=5
        )
    ]
    error = json.loads(events[-2][len("data: ") :])["error"]
    assert error["type"] == "server_error" and SECRET not in events[-2]
