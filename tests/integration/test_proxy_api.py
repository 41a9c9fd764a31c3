"""The best-of-N proxy through the app (lifespan running) against a scripted upstream (respx),
with the official `openai` SDK as the client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import respx
from asgi_lifespan import LifespanManager

from service.app import create_app
from service.schemas.openai import ChatCompletionResponse
from service.settings import Settings
from tests.integration.conftest import wait_ready

UPSTREAM = "http://upstream.test/v1"
SECRET = "sk-upstream-secret-123"
EXACT = {"engine": "onnxruntime", "precision": "fp32"}


def _sample_text(body: dict[str, Any], index: int) -> str:
    knobs = [f"{k}={body[k]}" for k in ("temperature", "top_p", "top_k", "seed") if k in body]
    return f"Paris is the capital. ({' '.join(knobs)} #{index})"


def _chat_reply(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    n = int(body.get("n", 1))
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": _sample_text(body, i)},
            "finish_reason": "stop" if i % 2 == 0 else "length",
        }
        for i in range(n)
    ]
    usage = {"prompt_tokens": 11, "completion_tokens": 5 * n, "total_tokens": 11 + 5 * n}
    return httpx.Response(
        200,
        json={
            "id": "up",
            "object": "chat.completion",
            "created": 1,
            "model": body["model"],
            "choices": choices,
            "usage": usage,
        },
    )


@pytest.fixture
def upstream() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=UPSTREAM, assert_all_called=False) as router:
        router.post("/chat/completions").mock(side_effect=_chat_reply)
        router.get("/models").respond(
            200, json={"object": "list", "data": [{"id": "up-model", "object": "model"}]}
        )
        yield router


async def _app(export: Path, **overrides: Any) -> tuple[LifespanManager, httpx.AsyncClient]:
    settings = Settings(
        model=str(export),
        upstream_base_url=UPSTREAM,
        upstream_api_key=SECRET,
        **EXACT,
        **overrides,
    )
    manager = LifespanManager(create_app(settings), startup_timeout=120)
    await manager.__aenter__()
    transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
    client = httpx.AsyncClient(transport=transport, base_url="http://cappy")
    await wait_ready(client)
    return manager, client


async def test_chat_best_of_17(tiny_export: Path, upstream: respx.MockRouter) -> None:
    manager, client = await _app(tiny_export)
    try:
        response = await client.post(
            "/v1/chat/completions",
            json={
                "model": "up-model",
                "seed": 7,
                "max_tokens": 32,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "cappy": {"return_candidates": True},
            },
        )
        assert response.status_code == 200, response.text
        body = ChatCompletionResponse.model_validate(response.json())
        cappy = body.cappy
        assert cappy is not None and cappy.candidates is not None
        assert len(cappy.candidates) == 17 == int(response.headers["x-cappy-candidates"])
        scores = [c.score for c in cappy.candidates]
        best = max(range(17), key=lambda i: (scores[i], -i))
        assert body.choices[0].message.content == cappy.candidates[best].text
        assert body.choices[0].finish_reason == cappy.candidates[best].finish_reason
        assert response.headers["x-cappy-winning-decoding"] == cappy.candidates[best].decoding
        # The selection used Cappy's real scores: /score gives the same numbers.
        rescored = await client.post(
            "/score",
            json={
                "pairs": [
                    {"instruction": "What is the capital of France?", "response": c.text}
                    for c in cappy.candidates
                ]
            },
        )
        assert [d["score"] for d in rescored.json()["data"]] == pytest.approx(scores, abs=1e-5)
        # Usage sums every upstream call; every call carried the upstream key, never ours.
        calls = upstream.calls
        sent = [json.loads(c.request.content) for c in calls]
        assert body.usage.completion_tokens == sum(5 * int(s.get("n", 1)) for s in sent)
        assert body.usage.prompt_tokens == 11 * len(calls)
        assert all(c.request.headers["authorization"] == f"Bearer {SECRET}" for c in calls)
        assert all("cappy" not in s for s in sent)
        assert len({s.get("seed") for s in sent}) == len(sent)
        assert SECRET not in response.text
        # The upstream takes llama.cpp's sampler extras: every call carried them.
        assert all(s["min_p"] == 0.0 and s["repeat_penalty"] == 1.0 for s in sent)
        assert {s["top_k"] for s in sent} == {0, 40}
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)


OFF = {"min_p": 0.0, "repeat_penalty": 1.0}
PAPER_SENDS = {
    "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, **OFF},
    "temperature_0.9": {"temperature": 0.9, "top_p": 1.0, "top_k": 0, **OFF},
    "top_k_40": {"temperature": 1.0, "top_p": 1.0, "top_k": 40, **OFF},
    "top_p_0.95": {"temperature": 1.0, "top_p": 0.95, "top_k": 0, **OFF},
    "greedy": {"temperature": 0.0, "top_k": 0, **OFF},
}


async def test_info_says_what_the_proxy_sends(tiny_export: Path) -> None:
    def refuse_unknown(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        unknown = sorted({"top_k", "min_p", "repeat_penalty"} & body.keys())
        if unknown:  # OpenAI's answer to a field it does not know
            message = f"Unrecognized request argument supplied: {unknown[0]}"
            return httpx.Response(400, json={"error": {"message": message, "code": None}})
        return _chat_reply(request)

    with respx.mock(base_url=UPSTREAM) as router:
        router.post("/chat/completions").mock(side_effect=refuse_unknown)
        manager, client = await _app(tiny_export, upstream_n_support="no")
        try:
            before = (await client.get("/info")).json()["proxy"]
            chat = {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}
            first = await client.post("/v1/chat/completions", json=chat)
            again = await client.post("/v1/chat/completions", json=chat)
            after = (await client.get("/info")).json()["proxy"]
            sent = [json.loads(c.request.content) for c in router.calls]
        finally:
            await client.aclose()
            await manager.__aexit__(None, None, None)
    assert first.status_code == 200 and again.status_code == 200
    assert before["upstream"] == UPSTREAM and before["top_k_support"] == "auto"
    assert before["sends"] == PAPER_SENDS and before["models"] == {}
    model = after["models"]["gpt-x"]
    assert (model["n"], model["top_k"], model["sampler_extras"]) == (False, False, False)
    assert model["sends"]["sampling"] == {"temperature": 1.0, "top_p": 1.0}
    assert model["sends"]["top_k_40"] == {"temperature": 1.0, "top_p": 1.0}
    assert model["sends"]["greedy"] == {"temperature": 0.0}
    # The second request went straight to what the upstream accepts: 17 calls, none refused.
    assert len(sent) == 17 + 4 + 17 + 17
    assert not any({"top_k", "min_p", "repeat_penalty"} & s.keys() for s in sent[-17:])


async def test_info_without_an_upstream_has_no_proxy(tiny_export: Path) -> None:
    settings = Settings(model=str(tiny_export), **EXACT)
    async with LifespanManager(create_app(settings), startup_timeout=120) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cappy") as client:
            await wait_ready(client)
            info = (await client.get("/info")).json()
    assert info["proxy"] is None


@pytest.mark.usefixtures("upstream")
async def test_openai_sdk_streaming_matches_non_streaming(tiny_export: Path) -> None:
    manager, client = await _app(tiny_export)
    try:
        sdk = openai.AsyncOpenAI(
            base_url="http://cappy/v1", api_key="unused", http_client=client, max_retries=0
        )
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name the capital of France."},
        ]
        plain = await sdk.chat.completions.create(model="up-model", messages=messages, seed=3)
        stream = await sdk.chat.completions.create(
            model="up-model",
            messages=messages,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert len({c.id for c in chunks}) == 1


async def test_all_upstream_calls_failing_is_502(tiny_export: Path) -> None:
    with respx.mock(base_url=UPSTREAM) as router:
        router.post("/chat/completions").respond(
            500, json={"error": {"message": f"boom, your key {SECRET} is bad"}}
        )
        manager, client = await _app(tiny_export, upstream_max_attempts=1)
        try:
            response = await client.post(
                "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            )
        finally:
            await client.aclose()
            await manager.__aexit__(None, None, None)
    assert response.status_code == 502
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "upstream_error"
    assert SECRET not in response.text and "boom" not in response.text


@pytest.mark.usefixtures("upstream")
async def test_models_pass_through_plus_scorer(tiny_export: Path) -> None:
    manager, client = await _app(tiny_export, model_name="cappy-tiny")
    try:
        response = await client.get("/v1/models")
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)
    ids = [m["id"] for m in response.json()["data"]]
    assert ids == ["up-model", "cappy-tiny"]


async def test_proxy_without_upstream_is_404(tiny_export: Path) -> None:
    settings = Settings(model=str(tiny_export))
    async with LifespanManager(create_app(settings), startup_timeout=120) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cappy") as client:
            await wait_ready(client)
            response = await client.post(
                "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "proxy_not_configured"


async def test_invalid_proxy_requests_are_400(
    tiny_export: Path, upstream: respx.MockRouter
) -> None:
    manager, client = await _app(tiny_export)
    try:
        n_two = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "n": 2, "messages": [{"role": "user", "content": "hi"}]},
        )
        bad_recipe = await client.post(
            "/v1/chat/completions",
            json={
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "cappy": {"recipe": [{"name": "x", "count": 1000}]},
            },
        )
        no_messages = await client.post("/v1/chat/completions", json={"model": "m"})
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)
    for response, param in ((n_two, "n"), (no_messages, "messages")):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
    assert bad_recipe.status_code == 400
    assert not upstream.calls
