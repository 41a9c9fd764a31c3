"""BestOfN: prepare (what the proxy refuses, before any call), the recipe a request asks for,
selection (argmax, ties to the first), usage, metrics, too few candidates."""

from __future__ import annotations

import pytest

from service.errors import envelope_for
from service.schemas.openai import CompletionRequest
from service.upstream import best_of_n
from service.upstream.answer import build_response, response_headers
from service.upstream.best_of_n import argmax_first
from service.upstream.errors import InvalidProxyRequest, NotEnoughCandidates
from tests.support.upstream import (
    PAPER_COUNTS,
    PROMPT_TOKENS,
    TOKENS_PER_CHOICE,
    FakeUpstream,
    Scorer,
    chat_request,
    fail_when,
    options,
    sample,
    select,
)


async def test_custom_recipe_from_the_request(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, n_support="yes")
    opts = options({"recipe": [{"name": "t07", "count": 3, "temperature": 0.7}]})
    before = sample("cappy_proxy_winning_decoding_total", decoding="custom")
    selection = await select(proxy, chat_request(), opts)
    assert upstream.bodies[0]["n"] == 3 and upstream.bodies[0]["temperature"] == 0.7
    assert len(upstream.bodies) == 1 and len(selection.candidates) == 3
    assert selection.planned == 3
    # Client-chosen names never become metric labels (unbounded cardinality).
    assert sample("cappy_proxy_winning_decoding_total", decoding="custom") == before + 1


def test_argmax_first():
    assert argmax_first([0.1, 0.5, 0.5, 0.2]) == 1
    assert argmax_first([0.3, 0.3]) == 0
    assert argmax_first([float("nan"), -5.0]) == 1
    assert argmax_first([-1.0]) == 0


async def test_selection_is_the_argmax_with_ties_to_the_first(make_proxy):
    scores = [0.1] * 17
    scores[5] = scores[9] = 0.9  # a tie: the earlier (5) wins
    scorer = Scorer(lambda _texts: list(scores))
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, scorer, n_support="no")
    selection = await select(proxy, chat_request(), options({"return_candidates": True}))
    assert selection.winner == 5
    response = build_response(selection)
    assert response.choices[0].message.content == selection.candidates[5].text
    assert response.choices[0].finish_reason == selection.candidates[5].finish_reason
    assert response.cappy is not None and response.cappy.winner == 5
    assert [c.score for c in response.cappy.candidates or []] == scores
    assert (
        response_headers(selection)["x-cappy-winning-decoding"] == selection.candidates[5].decoding
    )
    instruction, texts = scorer.calls[0]
    assert instruction == "Name a color." and len(texts) == 17 and len(scorer.calls) == 1


async def test_usage_sums_every_sample(make_proxy):
    for n_support, calls in (("no", 17), ("yes", 5)):
        upstream = FakeUpstream()
        selection = await select(
            make_proxy(upstream, n_support=n_support), chat_request(), options()
        )
        assert len(upstream.bodies) == calls
        usage = build_response(selection).usage
        assert usage.prompt_tokens == PROMPT_TOKENS * calls
        assert usage.completion_tokens == TOKENS_PER_CHOICE * 17
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_metrics_are_recorded(make_proxy):
    candidates = sample("cappy_proxy_candidates_sum")
    durations = sample("cappy_proxy_duration_seconds_count")
    winners = {
        name: sample("cappy_proxy_winning_decoding_total", decoding=name) for name in PAPER_COUNTS
    }
    selection = await select(make_proxy(FakeUpstream()), chat_request(), options())
    assert sample("cappy_proxy_candidates_sum") == candidates + 17
    assert sample("cappy_proxy_duration_seconds_count") == durations + 1
    won = selection.best.decoding
    assert sample("cappy_proxy_winning_decoding_total", decoding=won) == winners[won] + 1


async def test_all_calls_failing_is_a_502_naming_what_failed(make_proxy):
    upstream = FakeUpstream(fail=fail_when(lambda _b: True, status=503))
    proxy = make_proxy(upstream, n_support="no")
    with pytest.raises(NotEnoughCandidates) as info:
        await select(proxy, chat_request(), options())
    error = info.value
    assert error.http_status == 502 and error.arrived == 0 and error.planned == 17
    assert "0 of 17 samples arrived" in error.message
    assert "greedy x1: http_5xx (503)" in error.message
    assert "top_k_40 x4: http_5xx (503)" in error.message
    envelope = envelope_for(error)["error"]
    assert envelope["type"] == "upstream_error" and envelope["code"] == "http_5xx"


async def test_min_candidates_floor(make_proxy):
    upstream = FakeUpstream(fail=fail_when(lambda b: b.get("temperature") == 0.9))
    proxy = make_proxy(upstream, n_support="no")
    assert (
        len((await select(proxy, chat_request(), options({"min_candidates": 13}))).candidates) == 13
    )
    with pytest.raises(NotEnoughCandidates) as info:
        await select(proxy, chat_request(), options({"min_candidates": 14}))
    assert info.value.arrived == 13 and "at least 14 required" in info.value.message


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (chat_request(n=2), "n"),
        (CompletionRequest(model="m", prompt="p", best_of=3), "best_of"),
        (CompletionRequest(model="m", prompt="p", echo=True), "echo"),
        (CompletionRequest(model="m", prompt=["a", "b"]), "prompt"),
    ],
)
def test_unservable_requests_are_refused_before_any_call(make_proxy, request_, param):
    upstream = FakeUpstream()
    with pytest.raises(InvalidProxyRequest) as info:
        make_proxy(upstream).prepare(request_)
    assert info.value.param == param and upstream.bodies == []


@pytest.mark.parametrize(
    ("request_", "renderer", "instruction"),
    [
        (chat_request(seed=3, temperature=0.2, stream=True), "render_chat_instruction", None),
        (
            CompletionRequest(model="smol", prompt=["Once upon"], n=1, seed=3, temperature=0.2),
            "render_completion_prompt",
            "Once upon",
        ),
    ],
)
async def test_prepare_validates_and_renders_once(
    make_proxy, monkeypatch, request_, renderer, instruction
):
    calls: list[object] = []
    real = getattr(best_of_n, renderer)

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(best_of_n, renderer, counting)
    scorer = Scorer()
    proxy = make_proxy(FakeUpstream(), scorer)
    prepared = proxy.prepare(request_)
    assert prepared.instruction == (instruction or "Name a color.") and prepared.seed == 3
    assert prepared.model == "smol" and not {"seed", "temperature", "stream", "n"} & set(
        prepared.body
    )
    selection = await proxy.select(prepared, options())
    assert len(calls) == 1 and scorer.calls[0][0] == prepared.instruction
    assert selection.instruction == prepared.instruction
