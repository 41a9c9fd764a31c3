"""ASGI middleware: the request-duration metric, the answer to requests cut short by a shutdown,
the API-key check and the request body size limit.

All plain ASGI (no BaseHTTPMiddleware): no extra task or body buffering per request. Their order,
outermost first (see `service.app.create_app`): metrics, shutdown, API key, body limit — so that
every answer is measured, and a caller without a key learns nothing from its body (not even its
size) before the 401. Every error is answered with `service.errors.error_response`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.deps import check_api_key
from service.errors import ApiError, error_response

logger = logging.getLogger(__name__)


async def _answer(error: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(error)(scope, receive, send)


class _HttpMiddleware:
    """Passes everything but HTTP requests (lifespan, websockets) straight to the app; an HTTP
    request goes to `handle`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class BodyLimitMiddleware(_HttpMiddleware):
    """Refuses bodies over `max_bytes` with 413, by Content-Length or while streaming.

    A chunked body (no Content-Length) is counted as it is read. Past the limit the read fails,
    and whatever the app makes of that failure (FastAPI answers a body it could not read with
    400) is dropped in favour of the 413, as long as nothing was sent yet.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(scope, receive, send)
                    return
        received = 0
        overflow = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, overflow
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    overflow = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if overflow and not started:
                return  # the app's answer to a body it could not read: the 413 replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if overflow and not started:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics.REQUESTS_REJECTED.labels(reason="body_too_large").inc()
        error = ApiError(413, f"Request body over {self.max_bytes} bytes.", code="body_too_large")
        await _answer(error, scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class ApiKeyMiddleware(_HttpMiddleware):
    """With API keys configured, every path except `public_paths` wants
    `Authorization: Bearer <key>`, checked from the headers before the body is read.

    Protected by default: a path is public only if it is listed (the routes of the public router
    and the OpenAPI pages, collected by `create_app`), so a new route cannot be left open by
    forgetting it here, and an unknown path answers 401 rather than 404 to a caller without a key.
    """

    def __init__(self, app: ASGIApp, keys: Sequence[str], public_paths: Collection[str]) -> None:
        super().__init__(app)
        self.keys = list(keys)
        self.public_paths = frozenset(public_paths)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.keys or scope["path"] in self.public_paths:
            await self.app(scope, receive, send)
            return
        authorization = ""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            check_api_key(authorization, self.keys)
        except ApiError as error:
            await _answer(error, scope, receive, send)
            return
        await self.app(scope, receive, send)


class ShutdownMiddleware(_HttpMiddleware):
    """Answers 503 (with the error envelope and `Retry-After`) to a request that the server
    cancels before it answered: uvicorn cancels what still runs when
    `CAPPY_GRACEFUL_SHUTDOWN_S` ends, and would otherwise send a plain-text 500 and log a
    traceback. The request's work was cancelled with it (its queued pairs are dropped).
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if started or task is None:
                raise
            # The cancellation is handled here, by answering: this task ends right after.
            task.uncancel()
            metrics.REQUESTS_REJECTED.labels(reason="shutdown").inc()
            logger.warning(
                "%s %s cut short by the server's shutdown: answered 503",
                scope.get("method", ""),
                _route(scope) or "(no route)",
            )
            error = ApiError(
                503,
                "The server shut down before the request finished; retry it.",
                type="server_error",
                code="shutting_down",
                headers={"Retry-After": "5", "Connection": "close"},
            )
            await _answer(error, scope, receive, send)


class MetricsMiddleware(_HttpMiddleware):
    """Observes `cappy_request_duration_seconds{route, status}` for every HTTP request.

    `routes` are the app's route paths (collected by `create_app`): each is its own label, and
    every other path is "other", so that the label's values stay bounded whatever paths clients
    send.
    """

    def __init__(self, app: ASGIApp, routes: Collection[str]) -> None:
        super().__init__(app)
        self.routes = frozenset(routes)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
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
                route=self._label(scope), status=str(status["code"])
            ).observe(time.perf_counter() - started)

    def _label(self, scope: Scope) -> str:
        """The matched route's path, else the request's path when it is one of the app's routes
        (answered before routing: a 401 from the API-key check, a 413 from the body limit),
        else "other"."""
        path = _route(scope) or scope.get("path", "")
        return path if path in self.routes else "other"


def _route(scope: Scope) -> str | None:
    """The path template of the route the request matched; None before routing or without a
    match."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else None
