"""ASGI middleware: the request body size limit and the request-duration metric.

Both are plain ASGI (no BaseHTTPMiddleware): no extra task or body buffering per request.
"""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics

_KNOWN_ROUTES = frozenset(
    {
        "/score",
        "/select",
        "/v1/rerank",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/ready",
        "/info",
        "/metrics",
        "/docs",
        "/openapi.json",
    }
)


def _error_body(message: str, code: str) -> bytes:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }
    return json.dumps(body).encode()


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(send)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        metrics.REQUESTS_REJECTED.labels(reason="body_too_large").inc()
        body = _error_body(f"Request body over {self.max_bytes} bytes.", "body_too_large")
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


class MetricsMiddleware:
    """Observes `cappy_request_duration_seconds{route, status}` for every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            metrics.REQUEST_DURATION.labels(
                route=_route(scope), status=str(status["code"])
            ).observe(time.perf_counter() - started)


def _route(scope: Scope) -> str:
    """The route template when matched, else the path if it is one of ours, else "other"
    (unbounded label values would blow up the metric's cardinality)."""
    route = scope.get("route")
    path = getattr(route, "path", None) or scope.get("path", "")
    return path if path in _KNOWN_ROUTES else "other"
