"""BestOfN against a real OpenAI-compatible server (llama-cpp-python + SmolLM2-135M-Instruct).

The scorer here is a TEST SCORER, not Cappy: it scores a sample by its length, so that the
expected winner is known. The full proxy-through-the-app test (with the real scorer) lives with
the routes.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Sequence

import httpx
import openai.types as oai
import openai.types.chat as oai_chat
import pytest

from service.errors import envelope_for
from service.schemas.openai import ChatCompletionRequest, CompletionRequest
from service.upstream.answer import build_response, stream_chunks
from service.upstream.best_of_n import BestOfN, ProxyConfig
from service.upstream.client import UpstreamClient, UpstreamConfig
from service.upstream.recipe import Recipe, resolve_options
from service.upstream.sse import KEEPALIVE, SSE_DONE, sse_stream
from tests.support.upstream import Ranked

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_TOKENS = 24


async def length_test_scorer(instruction: str, texts: Sequence[str]) -> list[Ranked]:
    """TEST SCORER (not Cappy): longer text scores higher; deterministic."""
    assert instruction
    return [Ranked(float(len(text))) for text in texts]


@pytest.fixture
async def proxy(llama_server: str):
    client = UpstreamClient(UpstreamConfig(base_url=llama_server, timeout_s=120.0))
    try:
        yield BestOfN(client, length_test_scorer, ProxyConfig(timeout_s=300.0))
    finally:
        await client.aclose()


async def served_model(proxy: BestOfN) -> str:
    models = await proxy.client.list_models()
    assert models["data"], models
    return str(models["data"][0]["id"])


async def test_best_of_17_chat_against_llama_cpp(proxy: BestOfN):
    model = await served_model(proxy)
    request = ChatCompletionRequest.model_validate(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Write one short sentence about the sea."}],
            "max_tokens": MAX_TOKENS,
        }
    )
    options = resolve_options({"return_candidates": True}, default_recipe=Recipe.default())
    selection = await proxy.select(proxy.prepare(request), options)

    # 17 real samples, as the paper's recipe asks.
    assert len(selection.candidates) == 17 and not selection.failures
    assert Counter(c.decoding for c in selection.candidates) == {
        "sampling": 4,
        "temperature_0.9": 4,
        "top_k_40": 4,
        "top_p_0.95": 4,
        "greedy": 1,
    }
    # llama-cpp-python ignores n > 1 silently: the proxy detected it and topped up.
    caps = proxy.capabilities(model)
    assert caps.n is False and caps.top_k is True and selection.substituted == []
    # Distinct seeds make the samples differ (a fixed seed would repeat one sample).
    assert len({c.seed for c in selection.candidates}) == 17
    texts = [c.text for c in selection.candidates]
    assert len(set(texts)) >= 8, texts
    # Usage sums every sample: the same prompt 17 times, and every sample's tokens.
    usage = selection.usage
    assert usage.prompt_tokens > 0 and usage.prompt_tokens % 17 == 0
    assert 17 <= usage.completion_tokens <= 17 * MAX_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The winner is the test scorer's argmax, ties to the first.
    lengths = [len(t) for t in texts]
    assert selection.winner == lengths.index(max(lengths))

    response = build_response(selection)
    parsed = oai_chat.ChatCompletion.model_validate(
        response.model_dump(mode="json", exclude_none=True)
    )
    assert parsed.choices[0].message.content == selection.best.text
    assert parsed.choices[0].finish_reason in ("stop", "length")
    assert response.cappy is not None and len(response.cappy.candidates or []) == 17

    chunks = [c async for c in stream_chunks(selection, include_usage=True)]
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == selection.best.text
    assert chunks[-1].choices == [] and chunks[-1].usage == selection.usage


async def test_completions_stream_with_keepalives_against_llama_cpp(proxy: BestOfN):
    model = await served_model(proxy)
    request = CompletionRequest(
        model=model, prompt="The capital of France is", max_tokens=12, seed=42
    )
    options = resolve_options(
        {
            "recipe": [
                {"name": "hot", "count": 3, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
                {"name": "greedy", "count": 1, "temperature": 0.0},
            ]
        },
        default_recipe=Recipe.default(),
    )
    task = asyncio.create_task(proxy.select(proxy.prepare(request), options))
    events = [
        e
        async for e in sse_stream(
            task, error_envelope=envelope_for, include_usage=True, keepalive_s=0.05
        )
    ]
    assert events[0] == KEEPALIVE  # four real generations take longer than 50 ms
    assert events[-1] == SSE_DONE
    data = [json.loads(e[len("data: ") :]) for e in events if e.startswith("data: {")]
    text = "".join(d["choices"][0]["text"] for d in data if d["choices"])
    selection = task.result()
    assert text == selection.best.text and len(selection.candidates) == 4
    assert sorted(c.seed for c in selection.candidates) == [42, 43, 44, 45]
    final = oai.Completion.model_validate(data[-2])
    assert final.choices[0].finish_reason in ("stop", "length")
    assert data[-1]["choices"] == [] and data[-1]["usage"]["total_tokens"] > 0


class RecordingTransport(httpx.AsyncBaseTransport):
    """The real network, with every request body and answer status kept."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.calls: list[tuple[dict, int]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "POST":
            self.calls.append((json.loads(request.content), response.status_code))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_llama_cpp_gets_and_accepts_the_sampler_extras(llama_server: str):
    recording = RecordingTransport()
    client = UpstreamClient(
        UpstreamConfig(base_url=llama_server, timeout_s=120.0), transport=recording
    )
    async with client:
        proxy = BestOfN(client, length_test_scorer, ProxyConfig(timeout_s=300.0))
        model = await served_model(proxy)
        request = CompletionRequest(model=model, prompt="The sea is", max_tokens=8, seed=5)
        options = resolve_options(None, default_recipe=Recipe.default())
        selection = await proxy.select(proxy.prepare(request), options)
    assert len(selection.candidates) == 17 and not selection.failures
    caps = proxy.capabilities(model)
    assert caps.extras is True and caps.top_k is True and selection.substituted == []
    # Every call carried the extras and was answered 200: llama.cpp takes them.
    assert recording.calls and all(status == 200 for _, status in recording.calls)
    for body, _ in recording.calls:
        assert body["min_p"] == 0.0 and body["repeat_penalty"] == 1.0, body
        if body["temperature"] == 0.0:
            assert body["top_k"] == 0 and "top_p" not in body  # greedy
        else:
            assert body["top_k"] in (0, 40) and body["top_p"] in (1.0, 0.95)
    assert sum(b["top_k"] == 40 for b, _ in recording.calls) == 4  # n ignored: single calls


async def test_the_extras_change_only_what_they_should(llama_server: str):
    """Seeded calls straight to llama.cpp: leaving the extras out is sampling with its defaults
    (top_k 40, min_p 0.05, repeat_penalty 1.1); with them, plain sampling differs from that, and
    greedy does not depend on top_k or min_p."""
    async with httpx.AsyncClient(base_url=llama_server, timeout=120) as http:
        model = str((await http.get("/models")).json()["data"][0]["id"])

        async def text(seed: int, **params: float) -> str:
            body = {"model": model, "prompt": "My favourite animal is", "max_tokens": 16}
            answer = await http.post("/completions", json={**body, "seed": seed, **params})
            assert answer.status_code == 200, answer.text
            return str(answer.json()["choices"][0]["text"])

        plain = {"temperature": 1.0, "top_p": 1.0}
        defaults = {"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1}
        extras = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
        seeds = (1, 2, 3)
        without = [await text(s, **plain) for s in seeds]
        assert without == [await text(s, **plain, **defaults) for s in seeds]
        with_extras = [await text(s, **plain, **extras) for s in seeds]
        assert with_extras != without
        assert with_extras == [await text(s, **plain, **extras) for s in seeds]  # seeded
        greedy = await text(1, temperature=0.0, **extras)
        assert greedy == await text(1, temperature=0.0, top_k=40, min_p=0.05, repeat_penalty=1.0)
