"""Typed accessors for what routes need (settings, the scoring runtime, the proxy) and the
API-key check."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.engine.runtime import ScoringRuntime
from service.errors import ApiError, not_ready
from service.metrics import REQUESTS_REJECTED
from service.settings import Settings
from service.upstream.best_of_n import BestOfN
from service.upstream.client import UpstreamClient
from service.upstream.recipe import Recipe


@dataclass(frozen=True, slots=True)
class ProxyState:
    """The best-of-N proxy, built by the app when CAPPY_UPSTREAM_BASE_URL is set: one upstream
    client, one `BestOfN` over it, the configured recipe."""

    client: UpstreamClient
    best_of_n: BestOfN
    recipe: Recipe


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_runtime(request: Request) -> ScoringRuntime:
    runtime: ScoringRuntime = request.app.state.runtime
    return runtime


def get_ready_runtime(runtime: Annotated[ScoringRuntime, Depends(get_runtime)]) -> ScoringRuntime:
    """The runtime, or 503 while the model loads, after a failed load, or while shutting down."""
    if runtime.ready:
        return runtime
    if runtime.loading:
        raise not_ready("The scorer is loading; retry shortly.")
    REQUESTS_REJECTED.labels(reason="not_ready").inc()
    raise not_ready("The scorer is not available.")


def get_optional_proxy(request: Request) -> ProxyState | None:
    """The proxy, or None when no upstream is configured."""
    proxy: ProxyState | None = request.app.state.proxy
    return proxy


def get_proxy(
    proxy: Annotated[ProxyState | None, Depends(get_optional_proxy)],
) -> ProxyState:
    """The proxy, or 404 when no upstream is configured."""
    if proxy is None:
        raise ApiError(
            404,
            "The proxy is not configured: set CAPPY_UPSTREAM_BASE_URL.",
            type="not_found_error",
            code="proxy_not_configured",
        )
    return proxy


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
RuntimeDep = Annotated[ScoringRuntime, Depends(get_runtime)]
ReadyRuntimeDep = Annotated[ScoringRuntime, Depends(get_ready_runtime)]
ProxyDep = Annotated[ProxyState, Depends(get_proxy)]
OptionalProxyDep = Annotated[ProxyState | None, Depends(get_optional_proxy)]


def check_api_key(authorization: str, keys: Sequence[str]) -> None:
    """`authorization` (the header's value) must be `Bearer <one of keys>`; no keys: anything.

    Every configured key is compared in constant time (no early exit), so timing says nothing
    about which key or how much of it matched. Keys are never logged.

    Raises:
        ApiError: 401 with `WWW-Authenticate: Bearer`.
    """
    if not keys:
        return
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token.encode(), key.encode())
    if scheme.lower() != "bearer" or not token or not matched:
        REQUESTS_REJECTED.labels(reason="unauthorized").inc()
        raise ApiError(
            401,
            "Missing or invalid API key: send `Authorization: Bearer <key>`.",
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """The API-key check as a dependency of the protected routers.

    `service.middleware.ApiKeyMiddleware` makes the same check before the body is read, so that
    a caller without a key learns nothing from how its body is judged; this dependency keeps a
    protected route protected wherever it is mounted.
    """
    check_api_key(request.headers.get("authorization", ""), settings.api_key_list())
