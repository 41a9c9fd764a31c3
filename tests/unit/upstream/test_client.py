"""UpstreamClient: retries and back-off, Retry-After, timeouts, classification, the in-flight cap,
metrics, and that no key ever leaks into messages, logs or metrics."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import time
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import respx
from prometheus_client import generate_latest

from service import metrics
from service.errors import envelope_for
from service.upstream.client import UpstreamClient, UpstreamConfig, redact_url
from service.upstream.errors import FailureKind, UpstreamError
from service.upstream.responses import parse_retry_after

BASE = "http://upstream.test/v1"
SECRET = "sk-test-SECRET-0123456789abcdef"
CHAT_OK = {
    "id": "x",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


class SleepRecorder:
    """Stands in for asyncio.sleep: records the delay, sleeps not at all."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or None) or 0.0


def make_client(sleep: SleepRecorder | None = None, **overrides) -> UpstreamClient:
    config = UpstreamConfig(
        **{
            "base_url": BASE,
            "api_key": SECRET,
            "max_attempts": 3,
            "backoff_base_s": 0.01,
            "backoff_max_s": 0.05,
            **overrides,
        }
    )
    return UpstreamClient(config, sleep=sleep or SleepRecorder())


@pytest.fixture
def mock():
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        yield router


async def test_success_sends_the_configured_key_and_returns_the_body(mock):
    route = mock.post("/chat/completions").respond(200, json=CHAT_OK)
    async with make_client() as client:
        assert await client.chat_completions(BODY) == CHAT_OK
    request = route.calls.last.request
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    assert str(request.url) == f"{BASE}/chat/completions"


async def test_per_call_key_wins_and_custom_header(mock):
    route = mock.post("/completions").respond(200, json={"choices": [{"index": 0, "text": "t"}]})
    async with make_client() as client:
        await client.completions({"model": "m", "prompt": "p"}, api_key="caller-token")
    assert route.calls.last.request.headers["authorization"] == "Bearer caller-token"
    async with make_client(api_key_header="api-key") as client:
        await client.completions({"model": "m", "prompt": "p"})
    headers = route.calls.last.request.headers
    assert headers["api-key"] == SECRET and "authorization" not in headers
    async with make_client(api_key=None) as client:
        await client.completions({"model": "m", "prompt": "p"})
    assert "authorization" not in route.calls.last.request.headers


async def test_429_then_200_honours_retry_after(mock):
    route = mock.post("/chat/completions")
    route.side_effect = [
        httpx.Response(429, headers={"Retry-After": "2"}, json={"error": {"code": "rate"}}),
        httpx.Response(200, json=CHAT_OK),
    ]
    sleep = SleepRecorder()
    retries = sample("cappy_upstream_retries_total")
    limited = sample("cappy_upstream_errors_total", kind="rate_limited")
    async with make_client(sleep) as client:
        assert (await client.chat_completions(BODY))["choices"]
    assert route.call_count == 2
    assert len(sleep.delays) == 1 and 2.0 <= sleep.delays[0] <= 2.2
    assert sample("cappy_upstream_retries_total") == retries + 1
    assert sample("cappy_upstream_errors_total", kind="rate_limited") == limited + 1


async def test_retry_after_http_date_and_ms(mock):
    when = email.utils.formatdate(time.time() + 3, usegmt=True)
    route = mock.post("/chat/completions")
    route.side_effect = [
        httpx.Response(503, headers={"Retry-After": when}),
        httpx.Response(429, headers={"retry-after-ms": "250"}),
        httpx.Response(200, json=CHAT_OK),
    ]
    sleep = SleepRecorder()
    async with make_client(sleep) as client:
        await client.chat_completions(BODY)
    assert 1.5 <= sleep.delays[0] <= 3.5
    assert 0.25 <= sleep.delays[1] <= 0.4


def test_parse_retry_after():
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 10, usegmt=True)
    assert parse_retry_after({"retry-after": "5"}) == 5.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after": "-3"}) == 0.0
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(10.0)
    assert parse_retry_after({"retry-after": "Thu, 01 Jan 1970 00:00:00 GMT"}, now=now) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5


async def test_5xx_retried_with_exponential_backoff_then_gives_up(mock):
    route = mock.post("/chat/completions").respond(503, json={"error": {"message": "busy"}})
    sleep = SleepRecorder()
    async with make_client(sleep, max_attempts=4, backoff_base_s=0.01) as client:
        with pytest.raises(UpstreamError) as info:
            await client.chat_completions(BODY)
    assert route.call_count == 4
    assert info.value.kind is FailureKind.HTTP_5XX and info.value.upstream_status == 503
    assert info.value.http_status == 502
    # Equal jitter: step/2 .. step with step = 0.01, 0.02, 0.04.
    for delay, step in zip(sleep.delays, (0.01, 0.02, 0.04), strict=True):
        assert step / 2 <= delay <= step


@pytest.mark.parametrize("status", [400, 401, 404, 422, 501])
async def test_client_errors_are_not_retried(mock, status):
    route = mock.post("/chat/completions").respond(
        status, json={"error": {"message": "nope", "code": "bad code!<script>"}}
    )
    async with make_client() as client:
        with pytest.raises(UpstreamError) as info:
            await client.chat_completions(BODY)
    assert route.call_count == 1
    error = info.value
    assert error.upstream_status == status
    assert error.kind is (FailureKind.HTTP_5XX if status >= 500 else FailureKind.HTTP_4XX)
    assert error.upstream_code == "badcodescript"  # sanitized identifier only
    assert "nope" not in error.message


async def test_retry_after_beyond_the_cap_fails_at_once(mock):
    route = mock.post("/chat/completions").respond(429, headers={"Retry-After": "120"})
    sleep = SleepRecorder()
    async with make_client(sleep, retry_after_max_s=30) as client:
        with pytest.raises(UpstreamError) as info:
            await client.chat_completions(BODY)
    assert route.call_count == 1 and sleep.delays == []
    assert info.value.kind is FailureKind.RATE_LIMITED and info.value.retry_after == 120


async def test_connection_errors_are_retried(mock):
    route = mock.post("/chat/completions")
    route.side_effect = [httpx.ConnectError("refused"), httpx.Response(200, json=CHAT_OK)]
    async with make_client() as client:
        await client.chat_completions(BODY)
    assert route.call_count == 2

    route.side_effect = httpx.ConnectError("refused")
    connection = sample("cappy_upstream_errors_total", kind="connection")
    async with make_client(max_attempts=2) as client:
        with pytest.raises(UpstreamError) as info:
            await client.chat_completions(BODY)
    assert info.value.kind is FailureKind.CONNECTION and info.value.http_status == 502
    assert sample("cappy_upstream_errors_total", kind="connection") == connection + 2


async def test_read_timeout_is_a_timeout_and_not_retried(mock):
    route = mock.post("/chat/completions").mock(side_effect=httpx.ReadTimeout("slow"))
    async with make_client() as client:
        with pytest.raises(UpstreamError) as info:
            await client.chat_completions(BODY)
    assert route.call_count == 1
    assert info.value.kind is FailureKind.TIMEOUT and info.value.http_status == 504


async def test_call_deadline_covers_a_hanging_upstream():
    async def handler(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json=CHAT_OK)

    config = UpstreamConfig(base_url=BASE, timeout_s=0.05)
    timeouts = sample("cappy_upstream_call_duration_seconds_count", outcome="timeout")
    async with UpstreamClient(config, transport=httpx.MockTransport(handler)) as client:
        started = time.perf_counter()
        with pytest.raises(UpstreamError) as info:
            await client.chat_completions(BODY)
        assert time.perf_counter() - started < 1.0
        with pytest.raises(UpstreamError):
            await client.chat_completions(BODY, timeout_s=0.01)  # per-call override
    assert info.value.kind is FailureKind.TIMEOUT and info.value.http_status == 504
    assert sample("cappy_upstream_call_duration_seconds_count", outcome="timeout") == timeouts + 2
    assert sample("cappy_upstream_in_flight") == 0


@pytest.mark.parametrize(
    ("path", "response"),
    [
        ("/chat/completions", httpx.Response(200, text="<html>oops</html>")),
        ("/chat/completions", httpx.Response(200, json=[1, 2])),
        ("/chat/completions", httpx.Response(200, json={"choices": []})),
        ("/chat/completions", httpx.Response(200, json={"choices": [{"text": "x"}]})),
        ("/chat/completions", httpx.Response(200, json={"error": {"message": "x"}})),
        ("/completions", httpx.Response(200, json={"choices": [{"message": {}}]})),
    ],
)
async def test_malformed_bodies(mock, path, response):
    route = mock.post(path).mock(return_value=response)
    malformed = sample("cappy_upstream_errors_total", kind="malformed")
    async with make_client() as client:
        with pytest.raises(UpstreamError) as info:
            if path == "/completions":
                await client.completions({"model": "m", "prompt": "p"})
            else:
                await client.chat_completions(BODY)
    assert route.call_count == 1  # not retried
    assert info.value.kind is FailureKind.MALFORMED and info.value.http_status == 502
    assert sample("cappy_upstream_errors_total", kind="malformed") == malformed + 1


async def test_in_flight_cap_bounds_concurrency():
    active = peak = 0

    async def handler(_request: httpx.Request) -> httpx.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        active -= 1
        return httpx.Response(200, json=CHAT_OK)

    config = UpstreamConfig(base_url=BASE, max_in_flight=2)
    async with UpstreamClient(config, transport=httpx.MockTransport(handler)) as client:
        await asyncio.gather(*(client.chat_completions(BODY) for _ in range(8)))
    assert peak == 2


async def test_list_models_passes_through(mock):
    models = {"object": "list", "data": [{"id": "smol", "object": "model", "owned_by": "me"}]}
    mock.get("/models").respond(200, json=models)
    async with make_client() as client:
        assert await client.list_models() == models


async def test_ok_calls_are_timed(mock):
    mock.post("/chat/completions").respond(200, json=CHAT_OK)
    before = sample("cappy_upstream_call_duration_seconds_count", outcome="ok")
    async with make_client() as client:
        await client.chat_completions(BODY)
    assert sample("cappy_upstream_call_duration_seconds_count", outcome="ok") == before + 1


async def test_no_secret_in_config_repr_errors_logs_or_metrics(mock, caplog):
    caplog.set_level(logging.DEBUG)
    # OpenAI's real 401 text quotes (part of) the key; the client must not copy it anywhere.
    mock.post("/chat/completions").respond(
        401, json={"error": {"message": f"Incorrect API key provided: {SECRET}", "code": None}}
    )
    mock.post("/completions").respond(503, text=f"upstream down, key={SECRET}")
    mock.get("/models").mock(side_effect=httpx.ConnectError(f"cannot connect with {SECRET}"))
    errors: list[UpstreamError] = []
    async with make_client(max_attempts=2) as client:
        assert SECRET not in repr(client.config)
        for call in (
            client.chat_completions(BODY),
            client.completions({"model": "m", "prompt": "p"}),
            client.list_models(),
        ):
            with pytest.raises(UpstreamError) as info:
                await call
            errors.append(info.value)
    for error in errors:
        assert SECRET not in str(error) and SECRET not in repr(error)
        assert SECRET not in str(envelope_for(error))
        assert error.__cause__ is None and error.__suppress_context__
    assert SECRET not in caplog.text
    assert SECRET not in generate_latest(metrics.REGISTRY).decode()


def test_redact_url():
    assert redact_url("https://user:pw@api.example.com:8443/v1?key=abc") == (
        "https://api.example.com:8443/v1"
    )
    assert redact_url("http://127.0.0.1:8080/v1") == "http://127.0.0.1:8080/v1"


def test_config_validation():
    with pytest.raises(ValueError):
        UpstreamConfig(base_url=BASE, max_attempts=0)
    with pytest.raises(ValueError):
        UpstreamConfig(base_url=BASE, timeout_s=0)


async def test_lone_surrogates_in_samples_are_repaired_and_counted(mock):
    """JSON may escape half a surrogate pair; the text it decodes to is not Unicode (it can be
    neither tokenized nor written as JSON). The client repairs it (U+FFFD), counts each sample
    it repaired, and leaves the other samples and valid pairs alone."""
    raw = (
        b'{"model": "m\\udc80", "choices": ['
        b'{"index": 0, "message": {"role": "assistant", "content": "ok \\ud83d\\ude00"}},'
        b'{"index": 1, "message": {"role": "assistant", "content": "bad \\ud800 text",'
        b' "tool_calls": [{"function": {"name": "f", "arguments": "\\udfff"}}]}},'
        b'{"index": 2, "message": {"role": "assistant", "content": "also \\udc00"}}]}'
    )
    mock.post("/chat/completions").respond(
        200, content=raw, headers={"content-type": "application/json"}
    )
    mock.get("/models").respond(
        200, content=b'{"data": [{"id": "x\\ud800"}]}', headers={"content-type": "application/json"}
    )
    before = sample("cappy_upstream_samples_repaired_total", reason="lone_surrogate")
    async with make_client() as client:
        payload = await client.chat_completions(BODY)
        models = await client.list_models()
    contents = [c["message"]["content"] for c in payload["choices"]]
    assert contents == ["ok \U0001f600", "bad \ufffd text", "also \ufffd"]
    assert payload["choices"][1]["message"]["tool_calls"][0]["function"]["arguments"] == "\ufffd"
    assert payload["model"] == "m\ufffd"
    assert models["data"][0]["id"] == "x\ufffd"
    assert sample("cappy_upstream_samples_repaired_total", reason="lone_surrogate") == before + 2
    # What the proxy answers with must now be writable as UTF-8 JSON.
    json.dumps(payload, ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize("max_in_flight", [1, 64, 150, 4096])
async def test_the_connection_pool_follows_the_in_flight_setting(
    max_in_flight: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CAPPY_UPSTREAM_MAX_IN_FLIGHT goes up to 4096: a pool fixed at 100 connections would
    queue every call past the 100th on the pool instead of letting the setting decide."""
    from service.app import proxy_state
    from service.settings import Settings

    pools: list[httpx.Limits] = []

    class RecordingClient(httpx.AsyncClient):
        def __init__(self, *args: Any, limits: httpx.Limits, **kwargs: Any) -> None:
            pools.append(limits)
            super().__init__(*args, limits=limits, **kwargs)

    monkeypatch.setattr(httpx, "AsyncClient", RecordingClient)
    settings = Settings(upstream_base_url=BASE, upstream_max_in_flight=max_in_flight)
    proxy = proxy_state(settings, SimpleNamespace(rank=None))
    assert proxy is not None
    await proxy.client.aclose()
    assert len(pools) == 1
    assert pools[0].max_connections == max_in_flight
    assert pools[0].max_keepalive_connections == max_in_flight
