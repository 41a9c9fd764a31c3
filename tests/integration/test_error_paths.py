"""The error paths the README promises, through the app with its lifespan and a gated scorer
(batches wait at the model until the test lets them through): 504 once a request's deadline
passes, 413 for a request larger than the whole queue, 503 for new requests while shutting
down, 503 for a request the server cuts at the end of its graceful shutdown, and a client that
disconnects (499 logged, its pairs never reach the model)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp, Message

from service import metrics
from service.app import create_app
from service.settings import Settings
from tests.integration.conftest import GatedScorer, loaded, wait_ready
from tests.integration.test_scoring_api import assert_error

EXACT = {"engine": "onnxruntime", "precision": "fp32"}
SELECT = {"instruction": "q", "candidates": ["a"]}


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or None) or 0.0


@dataclass
class Served:
    app: ASGIApp
    client: httpx.AsyncClient
    scorer: GatedScorer
    stop: asyncio.Event
    lifespan: asyncio.Task[None]


@asynccontextmanager
async def serving(
    export: Path, gated: list[GatedScorer], **overrides: Any
) -> AsyncIterator[Served]:
    """The app with its lifespan in a task of its own, so that a test can start the shutdown
    (`stop.set()`) while requests are in flight; the scorer warmed up and ready."""
    app = create_app(Settings(model=str(export), **EXACT, **overrides))
    stop = asyncio.Event()
    started: asyncio.Future[ASGIApp] = asyncio.get_running_loop().create_future()

    async def run() -> None:
        async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60) as manager:
            started.set_result(manager.app)
            await stop.wait()

    lifespan = asyncio.create_task(run())
    await asyncio.wait({lifespan, started}, return_when=asyncio.FIRST_COMPLETED)
    asgi = started.result()
    transport = httpx.ASGITransport(app=asgi, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://cappy") as client:
        scorer = await loaded(gated)
        scorer.warm_gate.set()
        await wait_ready(client)
        served = Served(asgi, client, scorer, stop, lifespan)
        try:
            yield served
        finally:
            scorer.run_gate.set()
            stop.set()
            await lifespan


async def call_asgi(
    app: ASGIApp, path: str, payload: dict[str, Any], leave: asyncio.Event
) -> list[Message]:
    """One request straight through the ASGI interface, whose client disconnects when `leave`
    is set (httpx's ASGI transport never disconnects early). Returns what the app sent."""
    body = json.dumps(payload).encode()
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"cappy"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("cappy", 80),
    }
    await app(scope, receive, send)
    return sent


def answer_of(sent: list[Message]) -> tuple[int, dict[str, str], Any]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(body)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Waits until `condition` holds (a test waits for an event, never a fixed time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


async def until_queued(pairs: int) -> None:
    """Waits until the batcher's queue holds `pairs` pairs (its gauge, set as pairs join)."""
    await until(lambda: sample("cappy_queue_pairs") == pairs, f"the queue holds {pairs} pairs")


async def hold_the_model(served: Served) -> asyncio.Task[httpx.Response]:
    """Closes the gate and sends one single-pair request, whose batch then waits at the model."""
    served.scorer.run_gate.clear()
    served.scorer.entered.clear()
    task = asyncio.create_task(served.client.post("/select", json=SELECT))
    assert await asyncio.to_thread(served.scorer.entered.wait, 30), "no batch reached the model"
    return task


async def test_deadline_passed_in_the_queue_is_504(
    tiny_export: Path, gated: list[GatedScorer]
) -> None:
    before = sample("cappy_requests_rejected_total", reason="deadline")
    async with serving(tiny_export, gated, request_timeout_s=0.5) as served:
        holder = await hold_the_model(served)
        late = await served.client.post("/select", json={"instruction": "q", "candidates": ["b"]})
        served.scorer.run_gate.set()
        held = await holder
    error = assert_error(late, 504, "deadline_exceeded")
    assert error["type"] == "timeout_error"
    # The held request's own deadline passed at the model too: a batch already running is
    # never interrupted, but its caller is answered at the deadline.
    assert held.status_code in (200, 504)
    assert sample("cappy_requests_rejected_total", reason="deadline") >= before + 1
    assert sum(served.scorer.rows) <= 1  # the late pair never reached the model


async def test_request_larger_than_the_whole_queue_is_413(
    tiny_export: Path, gated: list[GatedScorer]
) -> None:
    limits = {"max_queue_tokens": 600, "max_batch_tokens": 64, "max_batch_size": 1}
    before = sample("cappy_requests_rejected_total", reason="too_large")
    async with serving(tiny_export, gated, **limits) as served:
        too_large = await served.client.post(
            "/select",
            json={"instruction": "q", "candidates": [f"word {i} " * 20 for i in range(8)]},
        )
        fits = await served.client.post("/select", json={"instruction": "q", "candidates": ["a"]})
    error = assert_error(too_large, 413, "request_too_large")
    assert "600" in error["message"]
    assert "Retry-After" not in too_large.headers  # retrying the same request cannot succeed
    assert fits.status_code == 200
    assert sample("cappy_requests_rejected_total", reason="too_large") == before + 1
    assert served.scorer.rows == [1]


async def test_new_requests_while_shutting_down_are_503_and_accepted_work_finishes(
    tiny_export: Path, gated: list[GatedScorer]
) -> None:
    async with serving(tiny_export, gated) as served:
        holder = await hold_the_model(served)
        served.stop.set()  # lifespan shutdown: the runtime stops accepting, then drains
        for _ in range(100):
            if (await served.client.get("/ready")).status_code == 503:
                break
            await asyncio.sleep(0.02)
        refused = await served.client.post("/select", json=SELECT)
        ready = await served.client.get("/ready")
        assert not served.lifespan.done()  # still draining the held request
        served.scorer.run_gate.set()
        held = await holder
        await asyncio.wait_for(asyncio.shield(served.lifespan), 30)
    error = assert_error(refused, 503, "not_ready")
    assert error["type"] == "server_error"
    assert int(refused.headers["Retry-After"]) > 0
    assert ready.status_code == 503
    assert held.status_code == 200, held.text  # accepted before the shutdown: answered
    assert served.scorer.rows == [1]


async def test_client_disconnect_is_499_and_nothing_is_scored(
    tiny_export: Path, gated: list[GatedScorer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.routes.scoring")
    before = sample("cappy_pairs_dropped_total", reason="cancelled")
    count_499 = sample("cappy_request_duration_seconds_count", route="/select", status="499")
    async with serving(tiny_export, gated) as served:
        holder = await hold_the_model(served)
        leave = asyncio.Event()
        payload = {"instruction": "q", "candidates": ["x", "y", "z"]}
        gone = asyncio.create_task(call_asgi(served.app, "/select", payload, leave))
        await until_queued(3)  # behind the held batch
        assert not gone.done()
        leave.set()
        sent = await asyncio.wait_for(gone, 10)
        served.scorer.run_gate.set()
        held = await holder
        await until(
            lambda: (
                sample("cappy_request_duration_seconds_count", route="/select", status="499")
                > count_499
            ),
            "the 499 is counted",
        )
    status, _, body = answer_of(sent)
    assert status == 499 and body["error"]["code"] == "client_closed"
    assert held.status_code == 200
    assert served.scorer.rows == [1]  # only the held request's one pair reached the model
    assert sample("cappy_pairs_dropped_total", reason="cancelled") == before + 3
    assert (
        sample("cappy_request_duration_seconds_count", route="/select", status="499")
        == count_499 + 1
    )
    assert any("499" in r.getMessage() for r in caplog.records)


async def test_request_cut_by_the_shutdown_is_503_with_the_envelope(
    tiny_export: Path, gated: list[GatedScorer]
) -> None:
    """uvicorn cancels what still runs when the graceful shutdown ends; the request is answered
    503 in the error envelope (not uvicorn's plain-text 500) and its task ends cleanly."""
    before = sample("cappy_requests_rejected_total", reason="shutdown")
    async with serving(tiny_export, gated) as served:
        holder = await hold_the_model(served)
        task = asyncio.create_task(
            call_asgi(
                served.app,
                "/select",
                {"instruction": "q", "candidates": ["p", "q"]},
                asyncio.Event(),
            )
        )
        await until_queued(2)
        task.cancel()  # what uvicorn does at the end of timeout_graceful_shutdown
        sent = await asyncio.wait_for(task, 10)  # answered, not cancelled
        served.scorer.run_gate.set()
        await holder
    assert not task.cancelled()
    status, headers, body = answer_of(sent)
    assert status == 503
    assert headers["content-type"] == "application/json"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "shutting_down" and body["error"]["type"] == "server_error"
    assert int(headers["retry-after"]) > 0
    assert sample("cappy_requests_rejected_total", reason="shutdown") == before + 1
    assert served.scorer.rows == [1]  # the cut request's pairs were dropped


async def test_a_shutdown_while_the_scorer_warms_up_stops_the_start(
    tiny_export: Path, gated: list[GatedScorer]
) -> None:
    """Told to stop while its scorer warms up (the gate held), the app stops the warm-up before
    its next batch instead of finishing it: the real warm-up never runs, nothing is served or
    left running, and the start is not a failure."""
    app = create_app(Settings(model=str(tiny_export), **EXACT))
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://cappy") as client:
            scorer = await loaded(gated)
            loading = await client.get("/ready")
            assert loading.status_code == 503 and loading.json()["status"] == "loading"
    runtime = app.state.runtime
    assert not scorer.warmed
    assert runtime.phase == "stopped" and runtime.load_error is None
    assert not runtime.batchers and not runtime.ready
