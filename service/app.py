"""`create_app(settings)`: wires settings, the scoring runtime, routers, exception handlers and
middleware into a FastAPI app. Nothing else lives here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from functools import partial
from importlib import metadata
from pathlib import Path

from fastapi import Depends, FastAPI
from starlette.routing import BaseRoute

from service.deps import ProxyState, require_api_key
from service.engine.batching_config import BatcherConfig
from service.engine.errors import EngineStopped
from service.engine.runtime import RuntimeConfig, ScoringRuntime
from service.errors import ApiError, register_exception_handlers
from service.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    ShutdownMiddleware,
)
from service.model_source import is_export_dir, resolve_export_dir
from service.routes import admin, health, proxy, scoring
from service.settings import Settings, get_settings
from service.upstream.best_of_n import BestOfN, ProxyConfig
from service.upstream.client import UpstreamClient, UpstreamConfig
from service.upstream.recipe import Recipe

logger = logging.getLogger(__name__)


def _version() -> str:
    try:
        return metadata.version("cappy-serve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def runtime_config(settings: Settings) -> RuntimeConfig:
    return RuntimeConfig(
        export_dir=Path(settings.model).expanduser(),
        device=settings.device,
        engine=settings.engine,
        precision=settings.precision,
        threads=settings.threads,
        streams=settings.streams,
        tensorrt=settings.tensorrt,
        trt_cache=settings.cache_dir / "tensorrt",
        max_rescored=settings.max_rescored,
        allow_ungated=settings.allow_ungated,
        batcher=BatcherConfig(
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue_tokens=settings.max_queue_tokens,
            max_queue_wait_s=settings.max_queue_wait_s,
            default_timeout_s=settings.request_timeout_s,
            cross_request=settings.cross_request_batching,
            padding_tolerance=settings.padding_tolerance,
            pad_to_multiple=settings.pad_to_multiple,
            split_across_streams=settings.split_across_streams,
        ),
    )


def proxy_state(settings: Settings, runtime: ScoringRuntime) -> ProxyState | None:
    """The best-of-N proxy over one shared upstream client, or None without an upstream.

    Raises:
        RecipeError: CAPPY_PROXY_RECIPE is invalid (fail at start, not at the first request).
    """
    if not settings.upstream_base_url:
        return None
    recipe = Recipe.from_setting(settings.proxy_recipe, max_samples=settings.proxy_max_samples)
    key = settings.upstream_api_key
    client = UpstreamClient(
        UpstreamConfig(
            base_url=settings.upstream_base_url,
            api_key=key.get_secret_value() if key is not None else None,
            api_key_header=settings.upstream_api_key_header,
            timeout_s=settings.upstream_timeout_s,
            max_in_flight=settings.upstream_max_in_flight,
            max_attempts=settings.upstream_max_attempts,
        )
    )
    # Ranked by the runtime, as /select is: proxy traffic batches with everything else.
    best_of_n = BestOfN(
        client,
        runtime.rank,
        ProxyConfig(
            n_support=settings.upstream_n_support,
            top_k_support=settings.upstream_top_k_support,
            timeout_s=settings.proxy_timeout_s,
            instruction_max_chars=settings.proxy_instruction_max_chars,
        ),
    )
    return ProxyState(client=client, best_of_n=best_of_n, recipe=recipe)


_background: set[asyncio.Task[None]] = set()


def reload_on_sighup(runtime: ScoringRuntime) -> None:
    """SIGHUP: re-reads CAPPY_MODEL (the environment, or a path such as a symlink that now
    points to another export) and switches to it as `POST /admin/reload` does."""
    task = asyncio.get_running_loop().create_task(reload_from_settings(runtime))
    _background.add(task)
    task.add_done_callback(_background.discard)


async def reload_from_settings(runtime: ScoringRuntime) -> None:
    model = Settings().model
    try:
        answer = await admin.reload_model(runtime, model)
    except ApiError as exc:
        logger.error("SIGHUP: reload of %s refused: %s", model, exc)
    except EngineStopped:
        logger.info("SIGHUP: reload of %s stopped by the shutdown", model)
    else:
        logger.info("SIGHUP: serving %s", answer["model"])


def _paths(routes: Iterable[BaseRoute]) -> set[str]:
    """The paths of `routes` (routers are included without a prefix: their paths are the
    app's)."""
    return {path for route in routes if isinstance(path := getattr(route, "path", None), str)}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for `settings.model`: an export directory, or a checkpoint or hub id that is
    exported (once, into `settings.cache_dir`) in the background while /health already answers
    and /ready says "exporting"."""
    settings = settings or get_settings()
    prepare = None
    if not is_export_dir(settings.model):
        model, cache_dir = settings.model, settings.cache_dir
        prepare = partial(resolve_export_dir, model, cache_dir)
    runtime = ScoringRuntime(runtime_config(settings), prepare)
    upstream = proxy_state(settings, runtime)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Load in the background: the port opens at once, /health answers, /ready stays 503
        # until the model is loaded and warm.
        loading = asyncio.create_task(runtime.start())
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            # Not on Windows, nor outside the main thread (some test runners).
            loop.add_signal_handler(signal.SIGHUP, reload_on_sighup, runtime)
        try:
            yield
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)
            # A start still under way stops where it stands (its export or warm-up batch).
            await runtime.stop(timeout=settings.graceful_shutdown_s)
            await loading
            if upstream is not None:
                await upstream.client.aclose()

    app = FastAPI(
        title="cappy-serve",
        version=_version(),
        description="Cappy (instruction, response) scoring: /score, /select, /v1/rerank; an "
        "OpenAI-compatible best-of-N proxy: /v1/chat/completions, /v1/completions, /v1/models.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.proxy = upstream
    register_exception_handlers(app)
    protected = (health.info_router, scoring.router, proxy.router, admin.router)
    app.include_router(health.router)
    for router in protected:
        app.include_router(router, dependencies=[Depends(require_api_key)])
    # The public routes are those of health.router plus FastAPI's OpenAPI pages; every other
    # path wants the key when keys are set (checked before the body is read).
    docs = (app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url)
    public = _paths(health.router.routes) | {url for url in docs if url}
    # Every route the app has (read from the routers: newer FastAPI lists an included router
    # as one entry of app.routes) is its own `route` label of the metrics; any other path is
    # "other".
    routes = public.union(_paths(app.routes), *(_paths(router.routes) for router in protected))
    # Added innermost first: metrics, shutdown, API key, body limit, then the routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_key_list(), public_paths=public)
    app.add_middleware(ShutdownMiddleware)
    app.add_middleware(MetricsMiddleware, routes=routes)
    return app
