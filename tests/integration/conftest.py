"""An app on a real export with its lifespan running, driven through httpx's ASGI transport;
a gated scorer that lets a test hold batches at the model."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager

from service.app import create_app
from service.engine import runtime as runtime_module
from service.engine.types import Scorer, stop_if_asked
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


class GatedScorer(Scorer):
    """Wraps the real scorer: warm-up and inference wait for the test to open a gate. One stage
    (a refining scorer's fast one: ranking re-scores nothing) and one batch at a time, so that a
    test holds the whole model with one batch."""

    parallelism = 1

    def __init__(self, inner: Scorer) -> None:
        self.inner = inner
        self.name = inner.name
        self.input_names = inner.input_names
        self.pad_token_id = inner.pad_token_id
        self.device = inner.device
        self.precision = inner.precision
        self.warm_gate = threading.Event()
        self.warmed = False  # the real scorer's warm-up has run
        self.run_gate = threading.Event()
        self.run_gate.set()
        self.fail_with: Exception | None = None
        self.entered = threading.Event()  # set when a batch reaches the model
        self.rows: list[int] = []  # rows of every batch the model scored (warm-up excluded)

    def warmup(self, stop: threading.Event | None = None) -> None:
        """Waits for `warm_gate` (30 s at most), checking `stop` as a warm-up batch does."""
        for _ in range(3000):
            if self.warm_gate.wait(0.01):
                break
            stop_if_asked(stop)
        self.inner.warmup(stop)
        self.warmed = True

    def calibrate(
        self, text: Sequence[Mapping[str, np.ndarray]], stop: threading.Event | None = None
    ) -> None:
        self.inner.calibrate(text, stop)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        self.entered.set()
        self.run_gate.wait(30)
        if self.fail_with is not None:
            raise self.fail_with
        scores = self.inner.infer(feeds)
        self.rows.append(len(scores))
        return scores


async def loaded(gated: list[GatedScorer]) -> GatedScorer:
    """The gated scorer, once the runtime (loading in a thread) has built it."""
    for _ in range(600):
        if gated:
            return gated[0]
        await asyncio.sleep(0.05)
    raise AssertionError("the scorer was never built")


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> list[GatedScorer]:
    made: list[GatedScorer] = []
    real = runtime_module.load_scorer

    def load(*args: Any, **kwargs: Any) -> GatedScorer:
        scorer = GatedScorer(real(*args, **kwargs))
        made.append(scorer)
        return scorer

    monkeypatch.setattr(runtime_module, "load_scorer", load)
    return made
