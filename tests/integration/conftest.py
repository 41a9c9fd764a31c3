"""An app on a real export with its lifespan running, driven through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from service.app import create_app
from service.settings import Settings


async def wait_ready(client: httpx.AsyncClient, timeout: float = 120.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if (await client.get("/ready")).status_code == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the app never became ready")


@asynccontextmanager
async def running_app(
    export_dir: Path | str, *, ready: bool = True, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(model=str(export_dir), **overrides)
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60) as manager:
        # Like a real server: an app exception becomes the 500 answer, not a test-side raise.
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://cappy") as client:
            if ready:
                await wait_ready(client)
            yield client


AppFactory = Callable[..., Any]


@pytest.fixture
def app_factory() -> AppFactory:
    return running_app
