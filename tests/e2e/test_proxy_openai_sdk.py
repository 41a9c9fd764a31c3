"""The whole product end to end: the unmodified `openai` SDK talks to cappy-serve (MiniLM export
as the scorer, default CPU engine), which fans out to a real llama.cpp server running
SmolLM2-135M-Instruct and answers with the best of 17 real samples."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from asgi_lifespan import LifespanManager

from service.app import create_app
from service.settings import Settings
from tests.integration.conftest import wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture
async def http(minilm_export: Path, llama_server: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(model=str(minilm_export), upstream_base_url=llama_server)
    async with LifespanManager(create_app(settings), startup_timeout=120) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://cappy", timeout=300
        ) as client:
            await wait_ready(client)
            yield client


async def test_best_of_17_real_samples(http: httpx.AsyncClient, llama_server: str) -> None:
    sdk = openai.AsyncOpenAI(base_url="http://cappy/v1", api_key="x", http_client=http)
    raw = await sdk.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=24,
        seed=11,
        extra_body={"cappy": {"return_candidates": True}},
    )
    answer = raw.parse()
    cappy = answer.model_extra["cappy"]
    candidates = cappy["candidates"]
    assert len(candidates) == 17 == int(raw.headers["x-cappy-candidates"])
    texts = [c["text"] for c in candidates]
    assert len(set(texts)) > 1, "distinct seeds must give distinct samples"
    scores = [c["score"] for c in candidates]
    best = max(range(17), key=lambda i: (scores[i], -i))
    assert answer.choices[0].message.content == texts[best]
    assert cappy["winner"] == best
    # /score agrees with the scores the proxy selected on.
    rescored = await http.post(
        "/score", json={"pairs": [{"instruction": QUESTION, "response": t} for t in texts]}
    )
    assert [d["score"] for d in rescored.json()["data"]] == pytest.approx(scores, abs=1e-4)
    # usage sums every call: at least 17 calls' prompts, each the same length.
    async with httpx.AsyncClient(base_url=llama_server, timeout=120) as direct:
        one = (
            await direct.post(
                "/chat/completions",
                json={
                    "model": "smollm2",
                    "max_tokens": 1,
                    "messages": [{"role": "user", "content": QUESTION}],
                },
            )
        ).json()["usage"]["prompt_tokens"]
    assert answer.usage.prompt_tokens % one == 0 and answer.usage.prompt_tokens >= 17 * one
    assert answer.usage.completion_tokens >= 17
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


async def test_streaming_through_the_proxy(http: httpx.AsyncClient) -> None:
    sdk = openai.AsyncOpenAI(base_url="http://cappy/v1", api_key="x", http_client=http)
    stream = await sdk.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in {"stop", "length"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 17
