"""The proxy against hostile or failing input, through the app with its lifespan: text that is
not Unicode (from the client: 400; from the upstream: repaired), streaming failures (a real
status while it can be given, else an error event the openai SDK raises), and the keys: ours on
the proxy routes, the caller's forwarded upstream."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import respx

from service import metrics
from service.schemas.openai import ChatCompletionResponse
from tests.integration.test_proxy_api import SECRET, UPSTREAM, _app, _chat_reply
from tests.integration.test_scoring_api import assert_error

JSON = {"content-type": "application/json"}
CHAT = {"model": "up-model", "messages": [{"role": "user", "content": "Capital of France?"}]}
ONE_SAMPLE = {"recipe": [{"name": "t1", "count": 1, "temperature": 1.0}]}


def repaired() -> float:
    value = metrics.REGISTRY.get_sample_value(
        "cappy_upstream_samples_repaired_total", {"reason": "lone_surrogate"}
    )
    return value or 0.0


@pytest.fixture
def upstream() -> Any:
    with respx.mock(base_url=UPSTREAM, assert_all_called=False) as router:
        router.post("/chat/completions").mock(side_effect=_chat_reply)
        router.post("/completions").respond(
            200,
            json={"choices": [{"index": 0, "text": "Paris.", "finish_reason": "stop"}]},
        )
        router.get("/models").respond(200, json={"object": "list", "data": [{"id": "up-model"}]})
        yield router


CLIENT_SURROGATES = [
    (
        "/v1/chat/completions",
        rb'{"model": "m", "messages": [{"role": "system", "content": "be brief"},'
        rb' {"role": "user", "content": "x\ud800y"}]}',
        "messages.1.content",
    ),
    (
        "/v1/chat/completions",
        rb'{"model": "m", "messages": [{"role": "user", "content":'
        rb' [{"type": "text", "text": "ok"}, {"type": "text", "text": "\udfff"}]}]}',
        "messages.0.content.1.text",
    ),
    (
        "/v1/chat/completions",
        rb'{"model": "m", "messages": [{"role": "user", "content": "hi"}],'
        rb' "metadata": {"tag": "\udc00"}}',
        "metadata.tag",
    ),
    ("/v1/completions", rb'{"model": "m", "prompt": "say \ud800"}', "prompt"),
    ("/v1/completions", rb'{"model": "m", "prompt": ["\ud800"]}', "prompt.0"),
]


@pytest.mark.parametrize(("path", "body", "param"), CLIENT_SURROGATES)
async def test_client_text_that_is_not_unicode_is_a_400(
    tiny_export: Path, upstream: respx.MockRouter, path: str, body: bytes, param: str
) -> None:
    manager, client = await _app(tiny_export)
    try:
        response = await client.post(path, content=body, headers=JSON)
        streamed = await client.post(path, content=body[:-1] + b', "stream": true}', headers=JSON)
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)
    for answer in (response, streamed):
        error = assert_error(answer, 400, "lone_surrogate")
        assert error["param"] == param
    assert not upstream.calls  # refused before anything was sent upstream


def _reply_with_a_lone_surrogate(request: httpx.Request) -> httpx.Response:
    """Like `_chat_reply`, but sample 1 of each call holds a lone surrogate (and so does
    each sample's logprobs token)."""
    reply = json.loads(_chat_reply(request).content)
    for choice in reply["choices"]:
        choice["logprobs"] = {"content": [{"token": "@@HALF@@", "logprob": -0.1}]}
    if len(reply["choices"]) > 1:
        reply["choices"][1]["message"]["content"] = "Paris @@HALF@@ is it"
    raw = json.dumps(reply).replace("@@HALF@@", "\\ud83d").encode()
    return httpx.Response(200, content=raw, headers=JSON)


async def test_upstream_samples_that_are_not_unicode_are_repaired(tiny_export: Path) -> None:
    """One odd upstream sample does not fail the request: its text is repaired (U+FFFD),
    counted, scored with the rest, and the answer is valid JSON and a valid stream."""
    before = repaired()
    with respx.mock(base_url=UPSTREAM) as router:
        router.post("/chat/completions").mock(side_effect=_reply_with_a_lone_surrogate)
        manager, client = await _app(tiny_export, upstream_n_support="yes")
        try:
            response = await client.post(
                "/v1/chat/completions",
                json={**CHAT, "logprobs": True, "cappy": {"return_candidates": True}},
            )
            sdk = openai.AsyncOpenAI(
                base_url="http://cappy/v1", api_key="x", http_client=client, max_retries=0
            )
            stream = await sdk.chat.completions.create(
                model="up-model", messages=CHAT["messages"], stream=True
            )
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
        finally:
            await client.aclose()
            await manager.__aexit__(None, None, None)
        calls = len(router.calls)
    assert response.status_code == 200, response.text
    body = ChatCompletionResponse.model_validate(response.json())
    assert body.cappy is not None and body.cappy.candidates is not None
    texts = [c.text for c in body.cappy.candidates]
    assert len(texts) == 17
    # Decodings with more than one sample came back with a repaired sample 1.
    assert sum("Paris \ufffd is it" == t for t in texts) == 4
    assert all("\ud83d" not in t for t in texts)
    assert "\ud83d" not in response.text and streamed
    # Each call's choices were checked: 4 samples with text, 17 with a logprobs token each.
    assert calls == 10  # 4 decodings x n=4 + greedy, for each of the two requests
    assert repaired() == before + 2 * 17


def _failing(status: int, delay_s: float = 0.0) -> Any:
    async def reply(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(delay_s)
        return httpx.Response(status, json={"error": {"message": f"boom {SECRET}"}})

    return reply


@contextlib.asynccontextmanager
async def _failing_stream(
    export: Path, status: int, *, delay_s: float, keepalive_s: float
) -> AsyncIterator[tuple[httpx.Response, Callable[[], Awaitable[Any]]]]:
    """The proxy over an upstream whose calls fail with `status` after `delay_s`: the raw answer
    to a streamed request, and a call that opens the same stream with the openai SDK."""
    with respx.mock(base_url=UPSTREAM) as router:
        router.post("/chat/completions").mock(side_effect=_failing(status, delay_s=delay_s))
        manager, client = await _app(
            export, upstream_max_attempts=1, proxy_stream_keepalive_s=keepalive_s
        )
        try:
            raw = await client.post(
                "/v1/chat/completions", json={**CHAT, "stream": True, "cappy": ONE_SAMPLE}
            )
            sdk = openai.AsyncOpenAI(
                base_url="http://cappy/v1", api_key="x", http_client=client, max_retries=0
            )

            def open_stream() -> Awaitable[Any]:
                return sdk.chat.completions.create(
                    model="up-model",
                    messages=CHAT["messages"],
                    stream=True,
                    extra_body={"cappy": ONE_SAMPLE},
                )

            yield raw, open_stream
        finally:
            await client.aclose()
            await manager.__aexit__(None, None, None)


async def test_streaming_failure_before_the_first_keepalive_has_a_real_status(
    tiny_export: Path,
) -> None:
    """The status line waits for the outcome while no keep-alive is due yet: the failure is a
    502 in the error envelope, which the SDK raises as an `APIStatusError`."""
    async with _failing_stream(tiny_export, 500, delay_s=0.6, keepalive_s=5.0) as (raw, stream):
        with pytest.raises(openai.APIStatusError) as caught:
            await stream()
    error = assert_error(raw, 502, "http_5xx")
    assert error["type"] == "upstream_error"
    assert raw.headers["content-type"] == "application/json"
    assert caught.value.status_code == 502 and caught.value.type == "upstream_error"
    assert SECRET not in raw.text and "boom" not in raw.text


async def test_streaming_failure_after_the_first_keepalive_is_an_error_event(
    tiny_export: Path,
) -> None:
    """Past the first keep-alive the 200 has gone out (an idle connection gets dropped); the
    failure is then one `data: {"error": ...}` event, which the openai SDK raises as an
    `APIError` carrying the envelope — never chunks that look like an answer."""
    async with _failing_stream(tiny_export, 503, delay_s=0.8, keepalive_s=0.3) as (raw, stream):
        opened = await stream()
        chunks = []
        with pytest.raises(openai.APIError) as caught:
            async for chunk in opened:
                chunks.append(chunk)
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[0] == ": keep-alive"  # sent as the status line went out, not one interval later
    data = [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: {")]
    assert len(data) == 1 and set(data[0]) == {"error"}
    assert set(data[0]["error"]) == {"message", "type", "param", "code"}
    assert data[0]["error"]["type"] == "upstream_error"
    assert events[-2:] == ["data: [DONE]", ""]
    assert not chunks
    assert not isinstance(caught.value, openai.APIStatusError)
    assert caught.value.type == "upstream_error" and caught.value.code == "http_5xx"
    assert "upstream failed" in caught.value.message
    assert SECRET not in raw.text


async def test_slow_stream_opens_with_a_keepalive_then_answers(tiny_export: Path) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.6)
        return _chat_reply(request)

    with respx.mock(base_url=UPSTREAM) as router:
        router.post("/chat/completions").mock(side_effect=slow)
        manager, client = await _app(tiny_export, proxy_stream_keepalive_s=0.3)
        try:
            raw = await client.post(
                "/v1/chat/completions", json={**CHAT, "stream": True, "cappy": ONE_SAMPLE}
            )
        finally:
            await client.aclose()
            await manager.__aexit__(None, None, None)
    assert raw.status_code == 200
    events = raw.text.split("\n\n")
    assert events[0] == ": keep-alive"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: {")]
    assert chunks and all("error" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}


async def test_proxy_routes_want_our_key_and_send_theirs(
    tiny_export: Path, upstream: respx.MockRouter
) -> None:
    ours = {"Authorization": "Bearer cappy-key"}
    manager, client = await _app(tiny_export, api_keys="cappy-key")
    try:
        refused = [
            await client.post("/v1/chat/completions", json=CHAT),
            await client.post(
                "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"}
            ),
            await client.post("/v1/completions", json={"model": "m", "prompt": "p"}),
            await client.get("/v1/models"),
            await client.post("/v1/chat/completions", content=b"garbage", headers=JSON),
        ]
        assert not upstream.calls
        chat = await client.post(
            "/v1/chat/completions", json={**CHAT, "cappy": ONE_SAMPLE}, headers=ours
        )
        completion = await client.post(
            "/v1/completions",
            json={"model": "m", "prompt": "p", "cappy": ONE_SAMPLE},
            headers=ours,
        )
        models = await client.get("/v1/models", headers=ours)
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)
    for response in refused:
        assert_error(response, 401, "invalid_api_key")
    assert [r.status_code for r in (chat, completion, models)] == [200] * 3
    sent = [call.request.headers.get("authorization") for call in upstream.calls]
    assert len(sent) == 3 and set(sent) == {f"Bearer {SECRET}"}


async def test_forward_client_key(tiny_export: Path, upstream: respx.MockRouter) -> None:
    """CAPPY_UPSTREAM_FORWARD_CLIENT_KEY: the caller's bearer goes upstream in place of the
    configured key; a caller without one gets the configured key; with CAPPY_API_KEYS set the
    bearer is our key, which is never sent upstream."""
    caller = {"Authorization": "Bearer sk-caller-own"}
    manager, client = await _app(tiny_export, upstream_forward_client_key=True)
    try:
        await client.post(
            "/v1/chat/completions", json={**CHAT, "cappy": ONE_SAMPLE}, headers=caller
        )
        await client.get("/v1/models", headers=caller)
        await client.post("/v1/chat/completions", json={**CHAT, "cappy": ONE_SAMPLE})
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)
    sent = [call.request.headers.get("authorization") for call in upstream.calls]
    assert sent == ["Bearer sk-caller-own", "Bearer sk-caller-own", f"Bearer {SECRET}"]

    upstream.reset()
    manager, client = await _app(
        tiny_export, upstream_forward_client_key=True, api_keys="cappy-key"
    )
    try:
        answer = await client.post(
            "/v1/chat/completions",
            json={**CHAT, "cappy": ONE_SAMPLE},
            headers={"Authorization": "Bearer cappy-key"},
        )
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)
    assert answer.status_code == 200
    assert [c.request.headers.get("authorization") for c in upstream.calls] == [f"Bearer {SECRET}"]
