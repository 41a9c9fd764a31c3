"""Fan-out against a scripted upstream: `n`, `top_k` and sampler-extras detection, seeds, what is
forwarded, partial failures, timeouts and the request deadline, secrets, cancelling every call;
the capabilities remembered per model."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter

import httpx
import pytest
from prometheus_client import generate_latest

from service import metrics
from service.errors import envelope_for
from service.upstream.answer import build_response, response_headers
from service.upstream.client import UpstreamClient, UpstreamConfig
from service.upstream.errors import FailureKind, NotEnoughCandidates
from service.upstream.fanout import SEED_SPACE, CapabilityCache, Fanout, UpstreamCapabilities
from service.upstream.recipe import Recipe
from tests.support.upstream import (
    BASE,
    PAPER_COUNTS,
    SECRET,
    FakeUpstream,
    chat_request,
    decoding_counts,
    fail_when,
    options,
    sample,
    select,
    wait_for,
)


async def test_fanout_with_n_support_uses_one_call_per_decoding(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, n_support="yes", top_k_support="yes")
    selection = await select(proxy, chat_request(), options())
    assert [b.get("n") for b in upstream.bodies] == [4, 4, 4, 4, None]
    assert len(selection.candidates) == 17
    assert decoding_counts(selection) == PAPER_COUNTS
    assert [c.index for c in selection.candidates] == list(range(17))  # recipe order


async def test_fanout_without_n_support_uses_single_calls(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, n_support="no", top_k_support="yes")
    selection = await select(proxy, chat_request(), options())
    assert len(upstream.bodies) == 17 and all("n" not in b for b in upstream.bodies)
    params = Counter(
        (b.get("temperature"), b.get("top_p"), b.get("top_k")) for b in upstream.bodies
    )
    assert params == {
        (1.0, 1.0, 0): 4,
        (0.9, 1.0, 0): 4,
        (1.0, 1.0, 40): 4,
        (1.0, 0.95, 0): 4,
        (0.0, None, 0): 1,
    }
    assert decoding_counts(selection) == PAPER_COUNTS


async def test_auto_detects_an_upstream_rejecting_n(make_proxy):
    upstream = FakeUpstream(n_mode="reject")
    proxy = make_proxy(upstream)
    selection = await select(proxy, chat_request(), options())
    assert decoding_counts(selection) == PAPER_COUNTS and not selection.failures
    assert len(upstream.bodies) == 4 + 1 + 16  # 4 rejected n=4 calls, then singles
    assert proxy.capabilities("smol").n is False
    upstream.bodies.clear()
    await select(proxy, chat_request(), options())
    assert len(upstream.bodies) == 17 and all("n" not in b for b in upstream.bodies)


@pytest.mark.parametrize("n_support", ["auto", "yes"])
async def test_silently_fewer_choices_are_topped_up(make_proxy, n_support):
    upstream = FakeUpstream(n_mode="ignore")  # llama-cpp-python: one choice whatever n is
    proxy = make_proxy(upstream, n_support=n_support)
    selection = await select(proxy, chat_request(), options())
    assert decoding_counts(selection) == PAPER_COUNTS
    assert len(upstream.bodies) == 4 + 1 + 12
    assert len({c.text for c in selection.candidates}) == 17
    if n_support == "auto":
        assert proxy.capabilities("smol").n is False
        upstream.bodies.clear()
        await select(proxy, chat_request(), options())
        assert len(upstream.bodies) == 17 and all("n" not in b for b in upstream.bodies)


async def test_n_support_is_learnt_per_model(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream)
    await select(proxy, chat_request(), options())
    assert proxy.capabilities("smol").n is True
    assert proxy.capabilities("other").n is None


async def test_top_k_not_accepted_is_substituted_and_reported(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, n_support="no", top_k_support="no")
    selection = await select(proxy, chat_request(), options({"return_candidates": True}))
    assert all("top_k" not in b for b in upstream.bodies)
    assert decoding_counts(selection) == PAPER_COUNTS
    assert selection.substituted == ["top_k_40"]
    assert response_headers(selection)["x-cappy-substituted"] == "top_k_40"
    flagged = {c.decoding for c in selection.candidates if c.substituted}
    assert flagged == {"top_k_40"}
    cappy = build_response(selection).cappy
    assert cappy is not None and cappy.substituted == ["top_k_40"]
    assert {c.decoding for c in cappy.candidates or [] if c.substituted} == {"top_k_40"}


@pytest.mark.parametrize("n_support", ["no", "auto"])
async def test_top_k_auto_falls_back_when_rejected(make_proxy, n_support):
    upstream = FakeUpstream(top_k="reject")
    proxy = make_proxy(upstream, n_support=n_support)
    selection = await select(proxy, chat_request(), options())
    assert decoding_counts(selection) == PAPER_COUNTS and not selection.failures
    assert selection.substituted == ["top_k_40"]
    assert proxy.capabilities("smol").top_k is False
    upstream.bodies.clear()
    again = await select(proxy, chat_request(), options())
    assert all("top_k" not in b for b in upstream.bodies)
    assert again.substituted == ["top_k_40"]


async def test_top_k_sent_where_accepted(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, n_support="no")
    selection = await select(proxy, chat_request(), options())
    assert sum(b.get("top_k") == 40 for b in upstream.bodies) == 4
    assert selection.substituted == [] and proxy.capabilities("smol").top_k is True
    assert "x-cappy-substituted" not in response_headers(selection)


@pytest.mark.parametrize(("n_support", "n_mode"), [("no", "honour"), ("yes", "ignore")])
async def test_every_call_gets_a_distinct_seed(make_proxy, n_support, n_mode):
    upstream = FakeUpstream(n_mode=n_mode)
    proxy = make_proxy(upstream, n_support=n_support)
    await select(proxy, chat_request(), options())
    seeds = [b["seed"] for b in upstream.bodies]
    assert len(seeds) == 17 and len(set(seeds)) == 17


async def test_client_seed_makes_seeds_reproducible(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, n_support="no")
    await select(proxy, chat_request(seed=1000), options())
    assert sorted(b["seed"] for b in upstream.bodies) == list(range(1000, 1017))


async def test_client_params_pass_through_and_the_recipe_owns_sampling(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, n_support="no")
    request = chat_request(
        temperature=0.3,
        top_p=0.5,
        top_k=3,
        max_tokens=12,
        stop=["\n"],
        stream=False,
        user="u1",
        min_p=0.1,  # unknown to the schema, but the recipe's: replaced by the extras' 0.0
        repeat_penalty=1.3,  # likewise
        typical_p=0.9,  # unknown to the schema and to the recipe: passed through
        cappy={"return_candidates": True},
    )
    await select(proxy, request, options({"return_candidates": True}))
    for body in upstream.bodies:
        assert body["max_tokens"] == 12 and body["stop"] == ["\n"] and body["typical_p"] == 0.9
        assert body["min_p"] == 0.0 and body["repeat_penalty"] == 1.0
        assert body["user"] == "u1" and body["model"] == "smol"
        assert body["messages"] == [{"role": "user", "content": "Name a color."}]
        assert not {"cappy", "stream", "stream_options"} & body.keys()
    assert {b["temperature"] for b in upstream.bodies} == {1.0, 0.9, 0.0}
    assert {b.get("top_p") for b in upstream.bodies} == {1.0, 0.95, None}
    assert {b.get("top_k") for b in upstream.bodies} == {40, 0}


async def test_client_sampler_fields_are_not_forwarded_where_no_extras_are_sent(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, n_support="no", top_k_support="no")
    await select(proxy, chat_request(min_p=0.1, repeat_penalty=1.3, top_k=3), options())
    assert not any({"top_k", "min_p", "repeat_penalty"} & b.keys() for b in upstream.bodies)


# --- llama.cpp's sampler extras -----------------------------------------------------------------
EXTRAS = {"min_p": 0.0, "repeat_penalty": 1.0}
PAPER_SENDS = {  # what the paper's decodings send to an upstream that accepts everything
    "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, **EXTRAS},
    "temperature_0.9": {"temperature": 0.9, "top_p": 1.0, "top_k": 0, **EXTRAS},
    "top_k_40": {"temperature": 1.0, "top_p": 1.0, "top_k": 40, **EXTRAS},
    "top_p_0.95": {"temperature": 1.0, "top_p": 0.95, "top_k": 0, **EXTRAS},
    "greedy": {"temperature": 0.0, "top_k": 0, **EXTRAS},
}
PLAIN_SENDS = {  # ... and to one that accepts neither top_k nor the extras (OpenAI)
    "sampling": {"temperature": 1.0, "top_p": 1.0},
    "temperature_0.9": {"temperature": 0.9, "top_p": 1.0},
    "top_k_40": {"temperature": 1.0, "top_p": 1.0},
    "top_p_0.95": {"temperature": 1.0, "top_p": 0.95},
    "greedy": {"temperature": 0.0},
}
SAMPLER_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")


def sent(bodies: list[dict]) -> Counter[str]:
    """How many calls sent each set of sampling parameters."""
    return Counter(
        json.dumps({k: b[k] for k in SAMPLER_FIELDS if k in b}, sort_keys=True) for b in bodies
    )


def expected(sends: dict[str, dict], calls: dict[str, int] = PAPER_COUNTS) -> Counter[str]:
    """`sent` of `calls[name]` calls of each decoding sending `sends[name]`."""
    counts: Counter[str] = Counter()
    for name, n in calls.items():
        counts[json.dumps(sends[name], sort_keys=True)] += n
    return counts


def refusing(*names: str, message: str | None = None):
    """An OpenAI-like upstream's answer to a call carrying any of `names`: a 400 naming the
    first of them (or saying `message`)."""

    def fail(body: dict, _index: int) -> httpx.Response | None:
        carried = [n for n in names if n in body]
        if not carried:
            return None
        text = message or f"Unrecognized request argument supplied: {carried[0]}"
        error = {"message": text, "type": "invalid_request_error"}
        return httpx.Response(400, json={"error": error})

    return fail


@pytest.mark.parametrize("n_support", ["no", "auto"])
async def test_accepted_extras_go_with_every_call(make_proxy, n_support):
    upstream = FakeUpstream(n_mode="ignore")  # llama-cpp-python
    proxy = make_proxy(upstream, n_support=n_support)
    selection = await select(proxy, chat_request(), options())
    assert decoding_counts(selection) == PAPER_COUNTS and not selection.failures
    # n ignored: 4 + 1 calls, then 12 top-ups; each decoding's calls send the same parameters.
    assert sent(upstream.bodies) == expected(PAPER_SENDS)
    caps = proxy.capabilities("smol")
    assert caps.extras is True and caps.top_k is True and selection.substituted == []
    upstream.bodies.clear()
    await select(proxy, chat_request(), options())
    assert sent(upstream.bodies) == expected(PAPER_SENDS)


@pytest.mark.parametrize("n_support", ["no", "yes"])
async def test_refused_extras_are_dropped_and_remembered(make_proxy, n_support):
    # OpenAI: every sampler field it does not know is a 400 naming it.
    upstream = FakeUpstream(fail=refusing("min_p", "repeat_penalty", "top_k"))
    proxy = make_proxy(upstream, n_support=n_support)
    calls = PAPER_COUNTS if n_support == "no" else dict.fromkeys(PAPER_COUNTS, 1)
    selection = await select(proxy, chat_request(), options())
    assert decoding_counts(selection) == PAPER_COUNTS and not selection.failures
    assert selection.substituted == ["top_k_40"]
    caps = proxy.capabilities("smol")
    assert caps.extras is False and caps.top_k is False
    # Every first call carried the extras and was asked again without them (the top-k
    # decoding's then once more, without top_k).
    first = upstream.bodies[: sum(calls.values())]
    assert sent(first) == expected(PAPER_SENDS, calls)
    assert len(upstream.bodies) == 2 * len(first) + calls["top_k_40"]
    upstream.bodies.clear()
    again = await select(proxy, chat_request(), options())
    assert sent(upstream.bodies) == expected(PLAIN_SENDS, calls) and not again.failures


async def test_an_unexplained_refusal_drops_the_extras_first(make_proxy):
    # A 400 that names nothing: single calls are asked again without the extras, and only then
    # (for the top-k decoding) without top_k.
    upstream = FakeUpstream(fail=refusing("min_p", message="bad request"))
    proxy = make_proxy(upstream, n_support="no")
    selection = await select(proxy, chat_request(), options())
    assert decoding_counts(selection) == PAPER_COUNTS and not selection.failures
    caps = proxy.capabilities("smol")
    assert caps.extras is False and caps.top_k is True and selection.substituted == []
    assert len(upstream.bodies) == 17 + 17
    upstream.bodies.clear()
    await select(proxy, chat_request(), options())
    assert [b.get("top_k") for b in upstream.bodies].count(40) == 4
    assert not any("min_p" in b or b.get("top_k") == 0 for b in upstream.bodies)


async def test_an_upstream_refusing_top_k_zero_keeps_top_k_40(make_proxy):
    # vLLM before 0.8: "top_k must be -1 (disable), or at least 1, got 0."
    def fail(body: dict, _index: int) -> httpx.Response | None:
        if body.get("top_k") == 0:
            message = "top_k must be -1 (disable), or at least 1, got 0."
            return httpx.Response(400, json={"error": {"message": message}})
        return None

    upstream = FakeUpstream(fail=fail)
    proxy = make_proxy(upstream, n_support="no")
    selection = await select(proxy, chat_request(), options())
    assert not selection.failures and selection.substituted == []
    caps = proxy.capabilities("smol")
    assert caps.extras is False and caps.top_k is True


async def test_a_decoding_keeps_its_own_top_k(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, n_support="no")
    recipe = [
        {"name": "k5", "count": 2, "temperature": 0.7, "top_k": 5},
        {"name": "k0", "count": 1, "temperature": 1.0, "top_k": 0},
        {"name": "plain", "count": 1, "temperature": 1.0},
    ]
    await select(proxy, chat_request(), options({"recipe": recipe}))
    sends = {
        "k5": {"temperature": 0.7, "top_k": 5, **EXTRAS},
        "k0": {"temperature": 1.0, "top_k": 0, **EXTRAS},
        "plain": {"temperature": 1.0, "top_k": 0, **EXTRAS},
    }
    assert sent(upstream.bodies) == expected(sends, {"k5": 2, "k0": 1, "plain": 1})


async def test_top_k_support_no_sends_no_extras(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, n_support="no", top_k_support="no")
    await select(proxy, chat_request(), options())
    assert sent(upstream.bodies) == expected(PLAIN_SENDS)
    caps = proxy.capabilities("smol")
    assert caps.extras is False and not caps.learn_extras


async def test_describe_says_what_each_decoding_sends(make_proxy):
    upstream = FakeUpstream(fail=refusing("min_p", "repeat_penalty", "top_k"))
    proxy = make_proxy(upstream, n_support="no")
    before = proxy.describe(Recipe.default())
    assert before["sends"] == PAPER_SENDS and before["models"] == {}
    assert before["recipe"] == Recipe.default().to_list()
    await select(proxy, chat_request(), options())
    after = proxy.describe(Recipe.default())
    smol = after["models"]["smol"]
    assert (smol["n"], smol["top_k"], smol["sampler_extras"]) == (False, False, False)
    assert smol["sends"] == PLAIN_SENDS


async def test_some_calls_failing_select_the_best_of_the_rest(make_proxy):
    upstream = FakeUpstream(fail=fail_when(lambda b: b.get("top_p") == 0.95))
    proxy = make_proxy(upstream, n_support="no")
    selection = await select(proxy, chat_request(), options({"return_candidates": True}))
    assert len(selection.candidates) == 13
    assert "top_p_0.95" not in decoding_counts(selection)
    assert selection.winner == max(range(13), key=lambda i: len(selection.candidates[i].text))
    cappy = build_response(selection).cappy
    assert cappy is not None and cappy.num_candidates == 13 and cappy.num_planned == 17
    assert [f.model_dump() for f in cappy.failures] == [
        {"decoding": "top_p_0.95", "kind": "http_5xx", "upstream_status": 500, "count": 4}
    ]
    assert response_headers(selection)["x-cappy-candidates"] == "13"


async def test_malformed_upstream_json(make_proxy):
    def fail(_body: dict, _index: int) -> httpx.Response:
        return httpx.Response(
            200, text='{"choices": [ oops', headers={"content-type": "application/json"}
        )

    proxy = make_proxy(FakeUpstream(fail=fail), n_support="no")
    with pytest.raises(NotEnoughCandidates) as info:
        await select(proxy, chat_request(), options())
    assert info.value.kind is FailureKind.MALFORMED and info.value.http_status == 502
    assert "malformed" in info.value.message


async def test_call_timeouts_are_a_504(make_proxy):
    upstream = FakeUpstream(block=asyncio.Event())
    proxy = make_proxy(upstream, n_support="no", call_timeout_s=0.05)
    with pytest.raises(NotEnoughCandidates) as info:
        await select(proxy, chat_request(), options())
    assert info.value.kind is FailureKind.TIMEOUT and info.value.http_status == 504
    assert "timeout" in info.value.message
    assert envelope_for(info.value)["error"]["type"] == "timeout_error"


async def test_proxy_deadline_selects_among_what_arrived(make_proxy):
    # The greedy call hangs; the request deadline cancels it and the other 16 are used.
    upstream = FakeUpstream(block=asyncio.Event(), block_if=lambda b: b["temperature"] == 0.0)
    proxy = make_proxy(upstream, n_support="no", proxy_timeout_s=0.2)
    selection = await select(proxy, chat_request(), options())
    assert len(selection.candidates) == 16 and "greedy" not in decoding_counts(selection)
    assert [f.decoding for f in selection.failures] == ["greedy"]
    assert selection.failures[0].error.kind is FailureKind.TIMEOUT
    assert upstream.cancelled == 1


async def test_no_secret_in_errors_or_logs(make_proxy, caplog):
    caplog.set_level(logging.DEBUG)

    def fail(_body: dict, _index: int) -> httpx.Response:
        return httpx.Response(
            401, json={"error": {"message": f"Incorrect API key provided: {SECRET}"}}
        )

    proxy = make_proxy(FakeUpstream(fail=fail), n_support="no")
    with pytest.raises(NotEnoughCandidates) as info:
        await select(proxy, chat_request(), options())
    assert "http_4xx (401)" in info.value.message
    assert SECRET not in str(info.value) and SECRET not in json.dumps(envelope_for(info.value))
    assert SECRET not in caplog.text
    assert SECRET not in generate_latest(metrics.REGISTRY).decode()


async def test_cancelling_the_request_cancels_every_upstream_call(make_proxy):
    upstream = FakeUpstream(block=asyncio.Event())
    proxy = make_proxy(upstream, n_support="no")
    in_flight = sample("cappy_upstream_in_flight")
    task = asyncio.create_task(select(proxy, chat_request(), options()))
    await wait_for(lambda: upstream.started == 17)
    assert sample("cappy_upstream_in_flight") == in_flight + 17
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Every upstream call was cancelled before the cancellation reached the caller.
    assert upstream.cancelled == 17
    assert sample("cappy_upstream_in_flight") == in_flight


async def test_fanout_needs_only_the_client_and_the_capabilities():
    upstream = FakeUpstream(n_mode="ignore")
    client = UpstreamClient(
        UpstreamConfig(base_url=BASE, max_attempts=1),
        transport=httpx.MockTransport(upstream.handler),
    )
    caps = UpstreamCapabilities.configured("yes", "no")
    assert caps.extras is False
    async with client:
        fanout = Fanout(client, caps, kind="text", body={"model": "m", "prompt": "p"}, seed=-2)
        planned = fanout.plan(Recipe.default().decodings)
        await fanout.run(5.0)
    assert planned == 17 and [c.index for c in fanout.candidates] == list(range(17))
    assert fanout.missing == [] and fanout.substituted == {"top_k_40"}
    # Fixed by the settings: the ignored n is topped up but not learnt; top_k is never sent.
    assert caps.n is True and caps.top_k is False
    assert all("top_k" not in b for b in upstream.bodies)
    assert sorted(b["seed"] for b in upstream.bodies) == [
        *range(15),
        SEED_SPACE - 2,
        SEED_SPACE - 1,
    ]


def test_capabilities_are_kept_for_the_last_256_models():
    cache = CapabilityCache("auto", "no")
    first = cache.get("m0")
    first.n = True
    assert cache.get("m0") is first
    for i in range(1, 257):
        cache.get(f"m{i}")
    again = cache.get("m0")
    assert again is not first and again.n is None and again.top_k is False
    assert again.learn_n and not again.learn_top_k
    assert again.extras is False and not again.learn_extras
