"""The upstream over HTTP with a tiny random causal LM: the OpenAI shapes, log-probabilities,
seeds, stops, errors, and concurrent requests run as one batched generate."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from loadtests.transformers_upstream.engine import Engine
from tests.unit.loadtests.transformers_upstream.conftest import Served, close, serve

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _post(served: Served, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(served.url + path, json=body, timeout=60)


def _chat(served: Served, **body: Any) -> dict[str, Any]:
    response = _post(served, "/chat/completions", {"model": "tiny", "messages": CHAT, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_models_health_and_stats(upstream: Served) -> None:
    models = httpx.get(upstream.url + "/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    root = upstream.url.removesuffix("/v1")
    assert httpx.get(root + "/health").json() == {"status": "ok"}
    stats = httpx.get(root + "/stats").json()
    assert stats["model"] == "tiny" and stats["batcher"]["worker_alive"] is True
    assert "generate_calls" in stats["engine"]


def test_chat_completion_with_logprobs(upstream: Served) -> None:
    body = _chat(upstream, max_tokens=6, seed=1, logprobs=True, top_logprobs=2)
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > 8  # the chat template's tokens too
    tokens = choice["logprobs"]["content"]
    assert len(tokens) == usage["completion_tokens"]
    assert choice["finish_reason"] == ("length" if len(tokens) == 6 else "stop")
    for token in tokens:
        assert token["logprob"] <= 0 and isinstance(token["token"], str)
        best = [t["logprob"] for t in token["top_logprobs"]]
        assert len(best) == 2 and best == sorted(best, reverse=True)
        assert token["logprob"] <= best[0] + 1e-6


def test_completion_with_logprobs(upstream: Served) -> None:
    response = _post(
        upstream,
        "/completions",
        {"model": "tiny", "prompt": "Q: Solve 2 + 3.\nA:", "max_tokens": 5, "logprobs": 1},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    (choice,) = body["choices"]
    assert isinstance(choice["text"], str)
    logprobs = choice["logprobs"]
    count = body["usage"]["completion_tokens"]
    assert len(logprobs["token_logprobs"]) == len(logprobs["tokens"]) == count
    assert len(logprobs["top_logprobs"]) == len(logprobs["text_offset"]) == count
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert all(v <= 0 for v in logprobs["token_logprobs"])


def test_greedy_is_deterministic_and_seeds_reproduce_samples(upstream: Served) -> None:
    def text(**body: Any) -> str:
        return _chat(upstream, max_tokens=8, **body)["choices"][0]["message"]["content"]

    assert text(temperature=0, seed=1) == text(temperature=0, seed=2) == text(temperature=0)
    assert text(seed=5) == text(seed=5)
    assert len({text(seed=s, top_p=0.95) for s in range(6)}) > 1


def test_n_answers_that_many_choices(upstream: Served) -> None:
    body = _chat(upstream, max_tokens=4, n=3, seed=10)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    one = _chat(upstream, max_tokens=4, seed=11)  # the second choice's seed
    assert body["choices"][1]["message"] == one["choices"][0]["message"]


def test_stop_cuts_the_text_before_it(upstream: Served) -> None:
    full = _chat(upstream, max_tokens=12, temperature=0)
    text = full["choices"][0]["message"]["content"]
    stop = next((c for c in text[2:] if c.isalnum()), None)
    if stop is None:
        pytest.skip(f"no letter to stop at in {text!r}")
    cut = _chat(upstream, max_tokens=12, temperature=0, stop=[stop, "never-there"])
    choice = cut["choices"][0]
    assert choice["message"]["content"] == text[: text.index(stop)]
    assert choice["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] <= full["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": CHAT, "stream": True}, "stream"),
        ({"messages": CHAT, "top_p": 2}, "top_p"),
        ({"messages": CHAT, "temperature": "hot"}, "temperature"),
        ({"messages": CHAT, "n": 0}, "n"),
        ({"messages": CHAT, "max_tokens": 10_000_000}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": CHAT, "stop": [1]}, "stop"),
    ],
)
def test_bad_requests_get_the_openai_error_envelope(
    upstream: Served, body: dict[str, Any], param: str
) -> None:
    error = _error(_post(upstream, "/chat/completions", {"model": "tiny", **body}), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_unknown_routes_and_bodies_that_are_not_json(upstream: Served) -> None:
    _error(_post(upstream, "/embeddings", {}), 404)
    response = httpx.post(upstream.url + "/completions", content=b"{not json", timeout=30)
    _error(response, 400)


def test_concurrent_requests_run_as_one_generate(engine: Engine) -> None:
    served = serve(engine, start_batcher=False)
    answers: list[httpx.Response] = []
    try:
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 5, "temperature": 0.7}
        threads = [
            threading.Thread(
                target=lambda s=seed: answers.append(
                    _post(served, "/chat/completions", {**body, "seed": s})
                )
            )
            for seed in range(5)
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while served.batcher.queued_rows() < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served.batcher.queued_rows() == 5
        calls, rows = engine.stats.generate_calls, engine.stats.rows
        served.batcher.start()
        for thread in threads:
            thread.join(120)
    finally:
        close(served)
    assert [a.status_code for a in answers] == [200] * 5
    assert engine.stats.generate_calls - calls == 1
    assert engine.stats.rows - rows == 5
