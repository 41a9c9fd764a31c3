"""Streaming a selection as server-sent events: keep-alive comments while the samples are
gathered, the answer's chunks framed as `data:` events, `data: [DONE]`, and an error raised
after the stream started as one in-stream error event."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from pydantic import BaseModel

from service import defaults
from service.upstream.answer import stream_chunks
from service.upstream.best_of_n import Selection
from service.upstream.errors import ProxyError

logger = logging.getLogger(__name__)

KEEPALIVE = ": keep-alive\n\n"
SSE_DONE = "data: [DONE]\n\n"

ErrorEnvelope = Callable[[BaseException], Mapping[str, Any]]
"""Maps an exception to its error body (`service.errors.envelope_for`: the HTTP layer owns it)."""


def sse_data(obj: BaseModel | Mapping[str, Any]) -> str:
    """One server-sent event carrying `obj` as JSON (None fields left out)."""
    if isinstance(obj, BaseModel):
        payload = obj.model_dump_json(exclude_none=True)
    else:
        payload = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


async def keepalive_until_done(task: asyncio.Future[Any], interval_s: float) -> AsyncIterator[str]:
    """Yields an SSE comment (`": keep-alive\\n\\n"`) every `interval_s` until `task` is done.

    Proxies and clients drop idle connections; the comments keep a stream alive while the
    samples are gathered. If the consumer stops early (the client disconnected and the server
    cancelled the response), `task` is cancelled and awaited, which cancels its upstream calls.
    """
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=interval_s)
            if not done:
                yield KEEPALIVE
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


async def sse_stream(
    selection: asyncio.Future[Selection],
    *,
    error_envelope: ErrorEnvelope,
    include_usage: bool = False,
    keepalive_s: float = defaults.PROXY_STREAM_KEEPALIVE_S,
    keepalive_at_once: bool = False,
) -> AsyncIterator[str]:
    """The whole SSE body of a streaming proxy response, ready for a streaming response.

    Keep-alive comments while `selection` (a task running `BestOfN.select`) runs, then the
    chunks of `stream_chunks`, then `data: [DONE]`. An error raised by the selection after the
    stream started becomes an OpenAI error event (`data: {"error": {...}}`, the body
    `error_envelope` gives for it) followed by `[DONE]` — the status line is already sent by
    then. To answer errors with a real status, wait on the task briefly before starting the
    stream and only stream if it is still running or succeeded. Closing this generator cancels
    the selection (and so every upstream call). With `keepalive_at_once` (the caller already
    held the status line for a keep-alive interval), a keep-alive comment opens the stream at
    once if the selection is still running.
    """
    try:
        if keepalive_at_once and not selection.done():
            yield KEEPALIVE
        async for comment in keepalive_until_done(selection, keepalive_s):
            yield comment
        try:
            result = selection.result()
        except Exception as error:  # reported in-stream: the 200 status line is already sent
            if not isinstance(error, ProxyError):
                logger.exception("proxy stream failed after it started")
            yield sse_data(error_envelope(error))
            yield SSE_DONE
            return
        async for chunk in stream_chunks(result, include_usage=include_usage):
            yield sse_data(chunk)
        yield SSE_DONE
    finally:
        if not selection.done():
            selection.cancel()
            await asyncio.wait({selection})
