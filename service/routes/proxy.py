"""The OpenAI-compatible best-of-N proxy: /v1/chat/completions, /v1/completions, /v1/models.

The proxy's state (one upstream client, one BestOfN, the configured recipe) is built in the
app's lifespan when CAPPY_UPSTREAM_BASE_URL is set; without it these routes answer 404.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.types import DecoratedCallable
from pydantic import BaseModel

from service.cancellation import ClientDisconnected, cancel_on_disconnect
from service.deps import OptionalProxyDep, ProxyDep, ProxyState, ReadyRuntimeDep, SettingsDep
from service.errors import client_closed, envelope_for
from service.model_source import display_name
from service.schemas.common import error_responses
from service.schemas.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)
from service.settings import Settings
from service.upstream.answer import build_response, response_headers
from service.upstream.recipe import resolve_options
from service.upstream.sse import sse_stream

router = APIRouter(tags=["proxy"])
_ERRORS = error_responses(400, 401, 404, 429, 500, 502, 503, 504)


def _caller_key(request: Request, settings: Settings) -> str | None:
    """The caller's bearer token, forwarded upstream only when configured to (and never when
    the token is one of this service's own API keys)."""
    if not settings.upstream_forward_client_key or settings.api_key_list():
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


@dataclass(frozen=True, slots=True)
class _Call:
    """What answering a sampling request takes besides its body."""

    request: Request
    proxy: ProxyState
    settings: Settings


def _call(request: Request, proxy: ProxyDep, _: ReadyRuntimeDep, settings: SettingsDep) -> _Call:
    """404 without a proxy, then 503 while the scorer is not ready (in this order)."""
    return _Call(request, proxy, settings)


CallDep = Annotated[_Call, Depends(_call)]


async def _answer(body: ChatCompletionRequest | CompletionRequest, call: _Call) -> Response:
    request, proxy, settings = call.request, call.proxy, call.settings
    options = resolve_options(
        body.cappy,
        default_recipe=proxy.recipe,
        default_min_candidates=settings.proxy_min_candidates,
        max_samples=settings.proxy_max_samples,
    )
    prepared = proxy.best_of_n.prepare(body)
    work = proxy.best_of_n.select(prepared, options, api_key=_caller_key(request, settings))
    if not body.stream:
        try:
            selection = await cancel_on_disconnect(request, work)
        except ClientDisconnected:
            raise client_closed() from None
        answer = build_response(selection).model_dump(mode="json", exclude_none=True)
        return JSONResponse(answer, headers=response_headers(selection))
    # Streaming: the status line waits for the outcome while it comes before the first
    # keep-alive is due, so a failure then is a real 4xx/5xx with the error envelope. Past that
    # the 200 and the headers go out with the first keep-alive (idle connections get dropped),
    # and a failure becomes one `data: {"error": {...}}` event, which the openai SDK raises
    # as `openai.APIError`.
    task = asyncio.ensure_future(work)
    try:
        await cancel_on_disconnect(
            request, asyncio.wait({task}, timeout=settings.proxy_stream_keepalive_s)
        )
    except ClientDisconnected:
        await _cancel(task)
        raise client_closed() from None
    except asyncio.CancelledError:
        await _cancel(task)
        raise
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if task.done():
        # A failure raises: answered with its status.
        headers.update(response_headers(task.result()))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    stream = sse_stream(
        task,
        error_envelope=envelope_for,
        include_usage=include_usage,
        keepalive_s=settings.proxy_stream_keepalive_s,
        keepalive_at_once=True,
    )
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancels the selection (and with it every upstream call) and waits for it to unwind."""
    task.cancel()
    await asyncio.wait({task})


def _sampling_route(
    path: str, answer: type[BaseModel], summary: str
) -> Callable[[DecoratedCallable], DecoratedCallable]:
    """Declares a best-of-N route: POST `path`, answered with an `answer` or an error."""
    return router.post(path, response_model=answer, responses=_ERRORS, summary=summary)


@_sampling_route("/v1/chat/completions", ChatCompletionResponse, "Best-of-N chat completion")
async def chat_completions(body: ChatCompletionRequest, call: CallDep) -> Response:
    """Samples the upstream with the recipe (default: the paper's 17), scores every sample
    against the conversation with Cappy and answers with the best; `stream` streams it."""
    return await _answer(body, call)


@_sampling_route("/v1/completions", CompletionResponse, "Best-of-N text completion")
async def completions(body: CompletionRequest, call: CallDep) -> Response:
    """Like /v1/chat/completions for a plain prompt."""
    return await _answer(body, call)


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(
    request: Request, settings: SettingsDep, runtime: ReadyRuntimeDep, proxy: OptionalProxyDep
) -> dict[str, Any]:
    """The upstream's models (passed through) plus the scorer."""
    models: list[dict[str, Any]] = []
    if proxy is not None:
        upstream = await proxy.client.list_models(api_key=_caller_key(request, settings))
        models = [m for m in upstream.get("data", []) if isinstance(m, dict)]
    models.append(
        {
            "id": display_name(settings, runtime.export),
            "object": "model",
            "created": 0,
            "owned_by": "cappy-serve",
        }
    )
    return {"object": "list", "data": models}
