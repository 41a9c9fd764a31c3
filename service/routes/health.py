"""Liveness, readiness, model information and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics
from service.deps import OptionalProxyDep, ProxyState, RuntimeDep, SettingsDep
from service.model_source import display_name
from service.schemas.common import error_responses

# Public: no API key, ever (service.app collects these paths for the API-key middleware).
router = APIRouter(tags=["operations"])
# /info describes the deployment: behind the API key like the scoring routes.
info_router = APIRouter(tags=["operations"])

_STATUS: dict[str, Any] = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "status": {"type": "string"},
                    "reason": {"type": "string"},
                },
                "required": ["status"],
            }
        }
    }
}
_METRICS_CONTENT = {
    CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}},
}


@router.get(
    "/health",
    responses={
        200: {**_STATUS, "description": "Alive."},
        503: {**_STATUS, "description": "The model failed to load or the batcher stopped."},
    },
)
async def health(runtime: RuntimeDep) -> JSONResponse:
    """Liveness: 503 once the model failed to load or the batcher died, else 200."""
    if runtime.load_error is not None:
        return JSONResponse({"status": "failed", "reason": "model failed to load"}, 503)
    if runtime.batchers and not runtime.alive and not runtime.loading:
        return JSONResponse({"status": "unhealthy", "reason": "batcher stopped"}, 503)
    return JSONResponse({"status": "ok"})


@router.get(
    "/ready",
    responses={
        200: {**_STATUS, "description": 'Loaded, warm, batcher alive: `{"status": "ready"}`.'},
        503: {
            **_STATUS,
            "description": "Not ready: `status` is exporting, loading or unavailable; "
            "`Retry-After` says when to ask again.",
        },
    },
)
async def ready(runtime: RuntimeDep) -> JSONResponse:
    """Readiness: 200 only when the model is loaded, warmed up and the batcher is alive; else 503
    with the phase ("exporting" a checkpoint on first start, "loading", or "unavailable")."""
    if runtime.ready:
        return JSONResponse({"status": "ready"})
    status = runtime.phase if runtime.loading else "unavailable"
    return JSONResponse({"status": status}, 503, headers={"Retry-After": "5"})


@info_router.get("/info", responses=error_responses(401))
async def info(
    runtime: RuntimeDep, settings: SettingsDep, proxy: OptionalProxyDep
) -> dict[str, Any]:
    """The served model, its export manifest, the engine, the request limits and, with an
    upstream configured, what the proxy sends it (null without one)."""
    export = runtime.export
    manifest = export.manifest if export is not None else None
    described = runtime.describe()
    return {
        "model": display_name(settings, runtime.export),
        "ready": runtime.ready,
        "source": manifest.source if manifest else None,
        "architecture": manifest.architecture if manifest else None,
        "max_length": manifest.max_length if manifest else None,
        "inputs": manifest.inputs if manifest else None,
        "parity": manifest.parity if manifest else None,
        # False: exported with `cappy export --parity record` (figures recorded, nothing gated),
        # served only because CAPPY_ALLOW_UNGATED is set.
        "parity_gated": export.gated if export is not None else None,
        "runtime": described,
        "score": "raw regression output logits[:, 0] (no sigmoid); ties to the lower index",
        "limits": {
            "max_items_per_request": settings.max_items_per_request,
            "max_text_chars": settings.max_text_chars,
            "max_body_bytes": settings.max_body_bytes,
            # Unset settings resolve by device once the model is loaded.
            "max_batch_tokens": described["max_batch_tokens"] or settings.max_batch_tokens,
            "max_batch_size": described["max_batch_size"] or settings.max_batch_size,
            "max_queue_wait_s": settings.max_queue_wait_s,
            "max_wait_ms": described["max_wait_ms"]
            if described["max_wait_ms"] is not None
            else settings.max_wait_ms,
            "max_queue_tokens": settings.max_queue_tokens,
            "request_timeout_s": settings.request_timeout_s,
        },
        "proxy": _proxy_info(proxy),
    }


def _proxy_info(proxy: ProxyState | None) -> dict[str, Any] | None:
    """The upstream (without credentials) and what each decoding sends it: before any call, and
    per model once its support for `n`, `top_k` and llama.cpp's sampler extras is known."""
    if proxy is None:
        return None
    return {
        "upstream": proxy.client.base_url_redacted,
        **proxy.best_of_n.describe(proxy.recipe),
    }


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": _METRICS_CONTENT,
            "description": f"Prometheus text exposition format (`{CONTENT_TYPE_LATEST}`).",
        }
    },
)
async def prometheus_metrics() -> Response:
    """Every `cappy_*` collector and the process metrics, for Prometheus to scrape."""
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
