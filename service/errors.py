"""HTTP errors: the API's own error type, the one builder of the error envelope, and every
exception handler, registered in layers from one function: framework errors, then domain errors
(engine, upstream), then a generic 500 that never echoes the exception."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics
from service.engine.errors import (
    DeadlineExceeded,
    EngineError,
    EngineStopped,
    InferenceFailed,
    Overloaded,
    RequestTooLarge,
)
from service.engine.tokenize import UnencodableText
from service.schemas.common import ErrorBody, ErrorResponse
from service.upstream.errors import ProxyError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered with the OpenAI envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - the envelope's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(message=message, type=type, param=param, code=code)
        self.headers = headers or {}


def envelope(error: ApiError) -> dict[str, Any]:
    """OpenAI's error envelope, `{"error": {"message", "type", "param", "code"}}`: the one place
    it is built (responses, in-stream error events, middleware answers)."""
    return ErrorResponse(error=error.body).model_dump()


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(envelope(error), status_code=error.status, headers=error.headers)


def not_ready(reason: str) -> ApiError:
    return ApiError(
        503, reason, type="server_error", code="not_ready", headers={"Retry-After": "5"}
    )


def client_closed() -> ApiError:
    """For a request whose client went away first; 499 is what proxies log for that. Nobody
    reads the answer."""
    return ApiError(499, "Client closed the request.", code="client_closed")


def _engine_error(exc: EngineError) -> ApiError:
    if isinstance(exc, Overloaded):
        seconds = max(1, math.ceil(exc.retry_after))
        return ApiError(
            429,
            f"The scorer is overloaded; retry in {seconds} s.",
            type="rate_limit_error",
            code="overloaded",
            headers={"Retry-After": str(seconds)},
        )
    if isinstance(exc, RequestTooLarge):
        return ApiError(413, str(exc), code="request_too_large")
    if isinstance(exc, DeadlineExceeded):
        metrics.REQUESTS_REJECTED.labels(reason="deadline").inc()
        return ApiError(
            504,
            "The request's deadline passed before it was scored.",
            type="timeout_error",
            code="deadline_exceeded",
        )
    if isinstance(exc, UnencodableText):
        metrics.REQUESTS_REJECTED.labels(reason="invalid").inc()
        return ApiError(400, f"{exc}.", code="invalid_text")
    if isinstance(exc, EngineStopped):
        return not_ready("The scorer is shutting down or unavailable.")
    if isinstance(exc, InferenceFailed):
        logger.error("inference failed", exc_info=exc.__cause__ or exc)
        return ApiError(500, "Inference failed.", type="server_error", code="inference_failed")
    logger.error("unexpected engine error", exc_info=exc)
    return ApiError(500, "Internal server error.", type="server_error")


def _proxy_error(exc: ProxyError) -> ApiError:
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return ApiError(
        exc.http_status,
        exc.message,
        type=exc.error_type,
        param=exc.param,
        code=exc.code,
        headers=headers,
    )


def envelope_for(exc: BaseException) -> dict[str, Any]:
    """The error body for an exception raised after a response started (an SSE stream): mapped
    as the exception handlers map it; an unknown exception is a 500 that never echoes it."""
    if isinstance(exc, ApiError):
        error = exc
    elif isinstance(exc, EngineError):
        error = _engine_error(exc)
    elif isinstance(exc, ProxyError):
        error = _proxy_error(exc)
    else:
        logger.error("unhandled error in a stream", exc_info=exc)
        error = ApiError(500, "Internal server error.", type="server_error")
    return envelope(error)


def _location(loc: tuple[int | str, ...], ctx: object = None) -> str | None:
    """The `param` of a validation error: its location without the leading "body", plus the
    path an error may carry in its context as `at` (a lone surrogate deep inside a field)."""
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]  # where the field was sent, not which field: a field may be named "query"
    parts = [str(part) for part in loc]
    at = ctx.get("at") if isinstance(ctx, dict) else None
    if isinstance(at, str) and at:
        parts.append(at)
    return ".".join(parts) or None


def register_exception_handlers(app: FastAPI) -> None:
    """Framework errors, then domain errors, then the catch-all 500."""

    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        param = _location(tuple(first.get("loc", ())), first.get("ctx"))
        if first.get("type") == "json_invalid":
            message = "The body is not valid JSON."
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more problem(s))"
        metrics.REQUESTS_REJECTED.labels(reason="invalid").inc()
        code = first.get("type")
        return error_response(
            ApiError(400, message, param=param, code=code if isinstance(code, str) else None)
        )

    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
        kind = kinds.get(exc.status_code, "invalid_request_error")
        if exc.status_code >= 500:
            kind = "server_error"
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        if exc.status_code == 400 and message == "There was an error parsing the body":
            message = "The body could not be parsed (it must be UTF-8 JSON)."
        return error_response(
            ApiError(exc.status_code, message, type=kind, headers=dict(exc.headers or {}))
        )

    async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    async def on_engine_error(_: Request, exc: EngineError) -> JSONResponse:
        return error_response(_engine_error(exc))

    async def on_proxy_error(_: Request, exc: ProxyError) -> JSONResponse:
        return error_response(_proxy_error(exc))

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return error_response(ApiError(500, "Internal server error.", type="server_error"))

    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(EngineError, on_engine_error)  # type: ignore[arg-type]
    app.add_exception_handler(ProxyError, on_proxy_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_unexpected)
