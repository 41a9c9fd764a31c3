"""BestOfN against a scripted OpenAI-compatible upstream (an httpx MockTransport handler):
fan-out and `n` detection, top_k substitution, seeds, selection, usage, partial failures,
timeouts, cancellation, instruction rendering, response and streaming shapes."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import Counter
from collections.abc import Callable

import httpx
import openai.types as oai
import openai.types.chat as oai_chat
import pytest
from prometheus_client import generate_latest

from service import metrics
from service.schemas.openai import ChatCompletionRequest, CompletionRequest
from service.upstream.best_of_n import (
    KEEPALIVE,
    SSE_DONE,
    BestOfN,
    ProxyConfig,
    argmax_first,
    build_response,
    render_chat_instruction,
    render_completion_prompt,
    split_text,
    sse_stream,
    stream_chunks,
)
from service.upstream.client import UpstreamClient, UpstreamConfig
from service.upstream.errors import (
    FailureKind,
    InvalidProxyRequest,
    NotEnoughCandidates,
)
from service.upstream.recipe import Recipe, resolve_options

BASE = "http://upstream.test/v1"
SECRET = "sk-test-SECRET-0123456789abcdef"
PROMPT_TOKENS = 10
TOKENS_PER_CHOICE = 5


class FakeUpstream:
    """A scripted OpenAI-compatible server.

    n_mode: "honour" (n choices), "reject" (400 on n > 1, like llama.cpp's C++ server),
    "ignore" (one choice whatever n is, like llama-cpp-python). top_k: "accept" or "reject".
    fail(body, call_index) may return a response to send instead. block: an event every call
    waits on first (None: no waiting).
    """

    def __init__(
        self,
        *,
        n_mode: str = "honour",
        top_k: str = "accept",
        fail: Callable[[dict, int], httpx.Response | None] | None = None,
        block: asyncio.Event | None = None,
        block_if: Callable[[dict], bool] | None = None,
    ):
        self.n_mode = n_mode
        self.top_k = top_k
        self.fail = fail
        self.block = block
        self.block_if = block_if or (lambda _body: True)
        self.bodies: list[dict] = []
        self.started = 0
        self.cancelled = 0

    async def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        index = len(self.bodies)
        self.bodies.append(body)
        if self.block is not None and self.block_if(body):
            self.started += 1
            try:
                await self.block.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.fail is not None:
            response = self.fail(body, index)
            if response is not None:
                return response
        if "top_k" in body and self.top_k == "reject":
            return httpx.Response(
                400, json={"error": {"message": "Unrecognized request argument supplied: top_k"}}
            )
        n = body.get("n", 1)
        if n > 1 and self.n_mode == "reject":
            return httpx.Response(
                400, json={"error": {"message": "Only one completion choice is allowed"}}
            )
        count = 1 if self.n_mode == "ignore" else n
        chat = request.url.path.endswith("chat/completions")
        choices = []
        for i in range(count):
            text = (
                f"answer t={body.get('temperature')} p={body.get('top_p')} "
                f"k={body.get('top_k')} seed={body.get('seed')} #{i}"
            )
            choice = {"index": i, "finish_reason": "stop" if i % 2 == 0 else "length"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        return httpx.Response(
            200,
            json={
                "id": f"up-{index}",
                "object": "chat.completion" if chat else "text_completion",
                "created": 1,
                "model": "fake-model",
                "system_fingerprint": "fp_fake",
                "choices": choices,
                "usage": {
                    "prompt_tokens": PROMPT_TOKENS,
                    "completion_tokens": TOKENS_PER_CHOICE * count,
                    "total_tokens": PROMPT_TOKENS + TOKENS_PER_CHOICE * count,
                },
            },
        )


class Scorer:
    """Test scorer: `fn(texts)` gives the scores (default: text length); records its calls."""

    def __init__(self, fn: Callable[[list[str]], list[float]] | None = None):
        self.fn = fn or (lambda texts: [float(len(t)) for t in texts])
        self.calls: list[tuple[str, list[str]]] = []

    async def __call__(self, instruction: str, texts: list[str]) -> list[float]:
        self.calls.append((instruction, list(texts)))
        return self.fn(texts)


@pytest.fixture
async def make_proxy():
    clients: list[UpstreamClient] = []

    def factory(
        upstream: FakeUpstream,
        scorer: Scorer | None = None,
        *,
        n_support: str = "auto",
        top_k_support: str = "auto",
        max_attempts: int = 1,
        call_timeout_s: float = 5.0,
        proxy_timeout_s: float = 5.0,
    ) -> BestOfN:
        client = UpstreamClient(
            UpstreamConfig(
                base_url=BASE,
                api_key=SECRET,
                max_attempts=max_attempts,
                timeout_s=call_timeout_s,
                backoff_base_s=0.001,
            ),
            transport=httpx.MockTransport(upstream.handler),
        )
        clients.append(client)
        config = ProxyConfig(
            n_support=n_support,  # type: ignore[arg-type]
            top_k_support=top_k_support,  # type: ignore[arg-type]
            timeout_s=proxy_timeout_s,
        )
        return BestOfN(client, scorer or Scorer(), config, rng=random.Random(7))

    yield factory
    for client in clients:
        await client.aclose()


def chat_request(**extra) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "smol", "messages": [{"role": "user", "content": "Name a color."}], **extra}
    )


def options(cappy: dict | None = None):
    return resolve_options(cappy, default_recipe=Recipe.default())


def decoding_counts(selection) -> dict[str, int]:
    return dict(Counter(c.decoding for c in selection.candidates))


PAPER_COUNTS = {"sampling": 4, "temperature_0.9": 4, "top_k_40": 4, "top_p_0.95": 4, "greedy": 1}


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or None) or 0.0


# --- fan-out ------------------------------------------------------------------------------------
async def test_fanout_with_n_support_uses_one_call_per_decoding(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, n_support="yes", top_k_support="yes")
    selection = await proxy.select(chat_request(), options())
    assert [b.get("n") for b in upstream.bodies] == [4, 4, 4, 4, None]
    assert len(selection.candidates) == 17
    assert decoding_counts(selection) == PAPER_COUNTS
    assert [c.index for c in selection.candidates] == list(range(17))  # recipe order


async def test_fanout_without_n_support_uses_single_calls(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, n_support="no", top_k_support="yes")
    selection = await proxy.select(chat_request(), options())
    assert len(upstream.bodies) == 17 and all("n" not in b for b in upstream.bodies)
    params = Counter(
        (b.get("temperature"), b.get("top_p"), b.get("top_k")) for b in upstream.bodies
    )
    assert params == {
        (1.0, 1.0, None): 4,
        (0.9, 1.0, None): 4,
        (1.0, 1.0, 40): 4,
        (1.0, 0.95, None): 4,
        (0.0, None, None): 1,
    }
    assert decoding_counts(selection) == PAPER_COUNTS


async def test_auto_detects_an_upstream_rejecting_n(make_proxy):
    upstream = FakeUpstream(n_mode="reject")
    proxy = make_proxy(upstream)
    selection = await proxy.select(chat_request(), options())
    assert decoding_counts(selection) == PAPER_COUNTS and not selection.failures
    assert len(upstream.bodies) == 4 + 1 + 16  # 4 rejected n=4 calls, then singles
    assert proxy.capabilities("smol").n is False
    upstream.bodies.clear()
    await proxy.select(chat_request(), options())
    assert len(upstream.bodies) == 17 and all("n" not in b for b in upstream.bodies)


@pytest.mark.parametrize("n_support", ["auto", "yes"])
async def test_silently_fewer_choices_are_topped_up(make_proxy, n_support):
    upstream = FakeUpstream(n_mode="ignore")  # llama-cpp-python: one choice whatever n is
    proxy = make_proxy(upstream, n_support=n_support)
    selection = await proxy.select(chat_request(), options())
    assert decoding_counts(selection) == PAPER_COUNTS
    assert len(upstream.bodies) == 4 + 1 + 12
    assert len({c.text for c in selection.candidates}) == 17
    if n_support == "auto":
        assert proxy.capabilities("smol").n is False
        upstream.bodies.clear()
        await proxy.select(chat_request(), options())
        assert len(upstream.bodies) == 17 and all("n" not in b for b in upstream.bodies)


async def test_n_support_is_learnt_per_model(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream)
    await proxy.select(chat_request(), options())
    assert proxy.capabilities("smol").n is True
    assert proxy.capabilities("other").n is None


# --- top_k --------------------------------------------------------------------------------------
async def test_top_k_not_accepted_is_substituted_and_reported(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, n_support="no", top_k_support="no")
    selection = await proxy.select(chat_request(), options({"return_candidates": True}))
    assert all("top_k" not in b for b in upstream.bodies)
    assert decoding_counts(selection) == PAPER_COUNTS
    assert selection.substituted == ["top_k_40"]
    assert selection.headers()["x-cappy-substituted"] == "top_k_40"
    flagged = {c.decoding for c in selection.candidates if c.substituted}
    assert flagged == {"top_k_40"}
    cappy = build_response(selection).cappy
    assert cappy is not None and cappy.substituted == ["top_k_40"]
    assert {c.decoding for c in cappy.candidates or [] if c.substituted} == {"top_k_40"}


@pytest.mark.parametrize("n_support", ["no", "auto"])
async def test_top_k_auto_falls_back_when_rejected(make_proxy, n_support):
    upstream = FakeUpstream(top_k="reject")
    proxy = make_proxy(upstream, n_support=n_support)
    selection = await proxy.select(chat_request(), options())
    assert decoding_counts(selection) == PAPER_COUNTS and not selection.failures
    assert selection.substituted == ["top_k_40"]
    assert proxy.capabilities("smol").top_k is False
    upstream.bodies.clear()
    again = await proxy.select(chat_request(), options())
    assert all("top_k" not in b for b in upstream.bodies)
    assert again.substituted == ["top_k_40"]


async def test_top_k_sent_where_accepted(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, n_support="no")
    selection = await proxy.select(chat_request(), options())
    assert sum(b.get("top_k") == 40 for b in upstream.bodies) == 4
    assert selection.substituted == [] and proxy.capabilities("smol").top_k is True
    assert "x-cappy-substituted" not in selection.headers()


# --- seeds and parameters -----------------------------------------------------------------------
@pytest.mark.parametrize(("n_support", "n_mode"), [("no", "honour"), ("yes", "ignore")])
async def test_every_call_gets_a_distinct_seed(make_proxy, n_support, n_mode):
    upstream = FakeUpstream(n_mode=n_mode)
    proxy = make_proxy(upstream, n_support=n_support)
    await proxy.select(chat_request(), options())
    seeds = [b["seed"] for b in upstream.bodies]
    assert len(seeds) == 17 and len(set(seeds)) == 17


async def test_client_seed_makes_seeds_reproducible(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, n_support="no")
    await proxy.select(chat_request(seed=1000), options())
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
        min_p=0.1,  # unknown to the schema: passed through
        cappy={"return_candidates": True},
    )
    await proxy.select(request, options({"return_candidates": True}))
    for body in upstream.bodies:
        assert body["max_tokens"] == 12 and body["stop"] == ["\n"] and body["min_p"] == 0.1
        assert body["user"] == "u1" and body["model"] == "smol"
        assert body["messages"] == [{"role": "user", "content": "Name a color."}]
        assert not {"cappy", "stream", "stream_options"} & body.keys()
    assert {b["temperature"] for b in upstream.bodies} == {1.0, 0.9, 0.0}
    assert {b.get("top_p") for b in upstream.bodies} == {1.0, 0.95, None}
    assert {b.get("top_k") for b in upstream.bodies} == {40, None}


async def test_custom_recipe_from_the_request(make_proxy):
    upstream = FakeUpstream()
    proxy = make_proxy(upstream, n_support="yes")
    opts = options({"recipe": [{"name": "t07", "count": 3, "temperature": 0.7}]})
    before = sample("cappy_proxy_winning_decoding_total", decoding="custom")
    selection = await proxy.select(chat_request(), opts)
    assert upstream.bodies[0]["n"] == 3 and upstream.bodies[0]["temperature"] == 0.7
    assert len(upstream.bodies) == 1 and len(selection.candidates) == 3
    assert selection.planned == 3
    # Client-chosen names never become metric labels (unbounded cardinality).
    assert sample("cappy_proxy_winning_decoding_total", decoding="custom") == before + 1


# --- selection ----------------------------------------------------------------------------------
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
    selection = await proxy.select(chat_request(), options({"return_candidates": True}))
    assert selection.winner == 5
    response = build_response(selection)
    assert response.choices[0].message.content == selection.candidates[5].text
    assert response.choices[0].finish_reason == selection.candidates[5].finish_reason
    assert response.cappy is not None and response.cappy.winner == 5
    assert [c.score for c in response.cappy.candidates or []] == scores
    assert selection.headers()["x-cappy-winning-decoding"] == selection.candidates[5].decoding
    instruction, texts = scorer.calls[0]
    assert instruction == "Name a color." and len(texts) == 17 and len(scorer.calls) == 1


async def test_usage_sums_every_sample(make_proxy):
    for n_support, calls in (("no", 17), ("yes", 5)):
        upstream = FakeUpstream()
        selection = await make_proxy(upstream, n_support=n_support).select(
            chat_request(), options()
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
    selection = await make_proxy(FakeUpstream()).select(chat_request(), options())
    assert sample("cappy_proxy_candidates_sum") == candidates + 17
    assert sample("cappy_proxy_duration_seconds_count") == durations + 1
    won = selection.best.decoding
    assert sample("cappy_proxy_winning_decoding_total", decoding=won) == winners[won] + 1


# --- failures -----------------------------------------------------------------------------------
def fail_when(predicate: Callable[[dict], bool], status: int = 500):
    def fail(body: dict, _index: int) -> httpx.Response | None:
        if predicate(body):
            return httpx.Response(status, json={"error": {"message": "boom", "code": None}})
        return None

    return fail


async def test_some_calls_failing_select_the_best_of_the_rest(make_proxy):
    upstream = FakeUpstream(fail=fail_when(lambda b: b.get("top_p") == 0.95))
    proxy = make_proxy(upstream, n_support="no")
    selection = await proxy.select(chat_request(), options({"return_candidates": True}))
    assert len(selection.candidates) == 13
    assert "top_p_0.95" not in decoding_counts(selection)
    assert selection.winner == max(range(13), key=lambda i: len(selection.candidates[i].text))
    cappy = build_response(selection).cappy
    assert cappy is not None and cappy.num_candidates == 13 and cappy.num_planned == 17
    assert [f.model_dump() for f in cappy.failures] == [
        {"decoding": "top_p_0.95", "kind": "http_5xx", "upstream_status": 500, "count": 4}
    ]
    assert selection.headers()["x-cappy-candidates"] == "13"


async def test_all_calls_failing_is_a_502_naming_what_failed(make_proxy):
    upstream = FakeUpstream(fail=fail_when(lambda _b: True, status=503))
    proxy = make_proxy(upstream, n_support="no")
    with pytest.raises(NotEnoughCandidates) as info:
        await proxy.select(chat_request(), options())
    error = info.value
    assert error.http_status == 502 and error.arrived == 0 and error.planned == 17
    assert "0 of 17 samples arrived" in error.message
    assert "greedy x1: http_5xx (503)" in error.message
    assert "top_k_40 x4: http_5xx (503)" in error.message
    envelope = error.to_envelope()["error"]
    assert envelope["type"] == "upstream_error" and envelope["code"] == "http_5xx"


async def test_min_candidates_floor(make_proxy):
    upstream = FakeUpstream(fail=fail_when(lambda b: b.get("temperature") == 0.9))
    proxy = make_proxy(upstream, n_support="no")
    assert (
        len((await proxy.select(chat_request(), options({"min_candidates": 13}))).candidates) == 13
    )
    with pytest.raises(NotEnoughCandidates) as info:
        await proxy.select(chat_request(), options({"min_candidates": 14}))
    assert info.value.arrived == 13 and "at least 14 required" in info.value.message


async def test_malformed_upstream_json(make_proxy):
    def fail(_body: dict, _index: int) -> httpx.Response:
        return httpx.Response(
            200, text='{"choices": [ oops', headers={"content-type": "application/json"}
        )

    proxy = make_proxy(FakeUpstream(fail=fail), n_support="no")
    with pytest.raises(NotEnoughCandidates) as info:
        await proxy.select(chat_request(), options())
    assert info.value.kind is FailureKind.MALFORMED and info.value.http_status == 502
    assert "malformed" in info.value.message


async def test_call_timeouts_are_a_504(make_proxy):
    upstream = FakeUpstream(block=asyncio.Event())
    proxy = make_proxy(upstream, n_support="no", call_timeout_s=0.05)
    with pytest.raises(NotEnoughCandidates) as info:
        await proxy.select(chat_request(), options())
    assert info.value.kind is FailureKind.TIMEOUT and info.value.http_status == 504
    assert "timeout" in info.value.message
    assert info.value.to_envelope()["error"]["type"] == "timeout_error"


async def test_proxy_deadline_selects_among_what_arrived(make_proxy):
    # The greedy call hangs; the request deadline cancels it and the other 16 are used.
    upstream = FakeUpstream(block=asyncio.Event(), block_if=lambda b: b["temperature"] == 0.0)
    proxy = make_proxy(upstream, n_support="no", proxy_timeout_s=0.2)
    selection = await proxy.select(chat_request(), options())
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
        await proxy.select(chat_request(), options())
    assert "http_4xx (401)" in info.value.message
    assert SECRET not in str(info.value) and SECRET not in json.dumps(info.value.to_envelope())
    assert SECRET not in caplog.text
    assert SECRET not in generate_latest(metrics.REGISTRY).decode()


# --- cancellation -------------------------------------------------------------------------------
async def wait_for(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_cancelling_the_request_cancels_every_upstream_call(make_proxy):
    upstream = FakeUpstream(block=asyncio.Event())
    proxy = make_proxy(upstream, n_support="no")
    in_flight = sample("cappy_upstream_in_flight")
    task = asyncio.create_task(proxy.select(chat_request(), options()))
    await wait_for(lambda: upstream.started == 17)
    assert sample("cappy_upstream_in_flight") == in_flight + 17
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Every upstream call was cancelled before the cancellation reached the caller.
    assert upstream.cancelled == 17
    assert sample("cappy_upstream_in_flight") == in_flight


async def test_closing_the_stream_cancels_the_gathering(make_proxy):
    upstream = FakeUpstream(block=asyncio.Event())
    proxy = make_proxy(upstream, n_support="no")
    task = asyncio.create_task(proxy.select(chat_request(), options()))
    events = sse_stream(task, keepalive_s=0.01)
    assert await anext(events) == KEEPALIVE
    await wait_for(lambda: upstream.started == 17)
    await events.aclose()  # what the server does when the client goes away
    assert task.cancelled() and upstream.cancelled == 17


# --- rendering and validation -------------------------------------------------------------------
def test_render_chat_instruction():
    one = [{"role": "user", "content": "What is 2+2?"}]
    assert render_chat_instruction(one) == "What is 2+2?"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe"},
                {"type": "image_url", "image_url": {"url": "x"}},
            ],
        },
    ]
    assert render_chat_instruction(conversation) == (
        "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: Describe\n[image_url]"
    )
    tools = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "1"},
    ]
    assert render_chat_instruction(tools) == (
        "User: Weather?\n\nAssistant: [tool call] weather({})\n\nTool: sunny"
    )


def test_render_chat_instruction_budget_keeps_the_last_user_turn():
    long = "x" * 500
    conversation = [
        {"role": "system", "content": "Be brief."},
        *[
            {"role": r, "content": f"{r} {i} {long}"}
            for i in range(4)
            for r in ("user", "assistant")
        ],
        {"role": "user", "content": "The actual question?"},
    ]
    rendered = render_chat_instruction(conversation, max_chars=1200)
    assert len(rendered) <= 1200
    assert rendered.endswith("User: The actual question?")
    assert rendered.startswith("System: Be brief.\n\n[... ")
    assert "earlier messages omitted]" in rendered
    # A budget that only the question fits drops everything else.
    tiny = render_chat_instruction(conversation, max_chars=10)
    assert tiny.endswith("User: The actual question?") and "System" not in tiny
    assert render_chat_instruction(
        ChatCompletionRequest.model_validate({"model": "m", "messages": conversation}).messages
    ) == render_chat_instruction(conversation)


def test_render_completion_prompt():
    assert render_completion_prompt("p") == "p"
    assert render_completion_prompt(["p"]) == "p"
    for bad in (["a", "b"], [1, 2, 3], [[1, 2]]):
        with pytest.raises(InvalidProxyRequest) as info:
            render_completion_prompt(bad)
        assert info.value.param == "prompt" and info.value.http_status == 400


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (chat_request(n=2), "n"),
        (CompletionRequest(model="m", prompt="p", best_of=3), "best_of"),
        (CompletionRequest(model="m", prompt="p", echo=True), "echo"),
        (CompletionRequest(model="m", prompt=["a", "b"]), "prompt"),
    ],
)
async def test_unservable_requests_are_refused_before_any_call(make_proxy, request_, param):
    upstream = FakeUpstream()
    with pytest.raises(InvalidProxyRequest) as info:
        await make_proxy(upstream).select(request_, options())
    assert info.value.param == param and upstream.bodies == []


# --- response and streaming shapes --------------------------------------------------------------
async def test_chat_response_is_a_valid_openai_chat_completion(make_proxy):
    selection = await make_proxy(FakeUpstream()).select(chat_request(), options())
    response = build_response(selection)
    wire = response.model_dump(mode="json", exclude_none=True)
    parsed = oai_chat.ChatCompletion.model_validate(wire)
    assert parsed.id.startswith("chatcmpl-") and parsed.model == "fake-model"
    assert parsed.choices[0].message.content == selection.best.text
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.system_fingerprint == "fp_fake"
    assert "cappy" not in wire  # only with return_candidates
    assert len(response.choices) == 1


async def test_completion_response_is_a_valid_openai_completion(make_proxy):
    upstream = FakeUpstream()
    selection = await make_proxy(upstream).select(
        CompletionRequest(model="m", prompt="Once upon", max_tokens=8),
        options({"return_candidates": True}),
    )
    assert all(b["prompt"] == "Once upon" for b in upstream.bodies)
    wire = build_response(selection).model_dump(mode="json", exclude_none=True)
    parsed = oai.Completion.model_validate(wire)
    assert parsed.object == "text_completion" and parsed.id.startswith("cmpl-")
    assert parsed.choices[0].text == selection.best.text
    assert wire["cappy"]["num_candidates"] == 17 and len(wire["cappy"]["candidates"]) == 17
    assert parsed.usage is not None and parsed.usage.completion_tokens == 85


def test_split_text_rejoins_exactly():
    text = "  The quick brown fox\njumps over   the lazy dog. "
    pieces = split_text(text, 8)
    assert "".join(pieces) == text and len(pieces) > 2
    assert split_text("", 8) == []


async def test_chat_stream_chunks(make_proxy):
    selection = await make_proxy(FakeUpstream()).select(
        chat_request(), options({"return_candidates": True})
    )
    chunks = [c async for c in stream_chunks(selection, include_usage=True, chunk_chars=8)]
    wires = [c.model_dump(mode="json", exclude_none=True) for c in chunks]
    parsed = [oai_chat.ChatCompletionChunk.model_validate(w) for w in wires]
    assert {p.id for p in parsed} == {selection.id}
    assert parsed[0].choices[0].delta.role == "assistant"
    content = [p.choices[0].delta.content or "" for p in parsed if p.choices]
    assert "".join(content) == selection.best.text and sum(map(bool, content)) >= 3
    finish = parsed[-2]
    assert finish.choices[0].finish_reason == selection.best.finish_reason
    assert wires[-2]["cappy"]["winner"] == selection.winner
    assert parsed[-1].choices == [] and parsed[-1].usage is not None
    assert parsed[-1].usage.total_tokens == selection.usage.total_tokens
    assert all(p.usage is None for p in parsed[:-1])
    without = [c async for c in stream_chunks(selection)]
    assert without[-1].choices and without[-1].choices[0].finish_reason


async def test_completion_stream_chunks(make_proxy):
    selection = await make_proxy(FakeUpstream()).select(
        CompletionRequest(model="m", prompt="p"), options()
    )
    chunks = [c async for c in stream_chunks(selection, include_usage=True, chunk_chars=8)]
    wires = [json.loads(c.model_dump_json(exclude_none=True)) for c in chunks]
    # As OpenAI streams them: every choice carries finish_reason, null until the last one.
    assert all("finish_reason" in ch for w in wires for ch in w["choices"])
    assert [w["choices"][0]["finish_reason"] for w in wires[:-1]][:-1] == [None] * (len(wires) - 2)
    assert "".join(w["choices"][0]["text"] for w in wires if w["choices"]) == selection.best.text
    assert {w["object"] for w in wires} == {"text_completion"}
    final = oai.Completion.model_validate(wires[-2])  # the finish chunk is a full Completion
    assert final.choices[0].finish_reason == selection.best.finish_reason
    assert wires[-1]["choices"] == [] and wires[-1]["usage"]["completion_tokens"] == 85


async def test_tool_call_winner_is_kept_and_streamed(make_proxy):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}

    def fail(_body: dict, _index: int) -> httpx.Response:
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        return httpx.Response(
            200,
            json={
                "model": "m",
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
            },
        )

    scorer = Scorer()
    selection = await make_proxy(FakeUpstream(fail=fail), scorer, n_support="no").select(
        chat_request(), options()
    )
    assert scorer.calls[0][1][0] == json.dumps([call], separators=(",", ":"))
    message = build_response(selection).choices[0].message
    assert message.tool_calls == [call] and message.content is None
    chunks = [c async for c in stream_chunks(selection)]
    deltas = [c.choices[0].delta for c in chunks]
    assert any(d.tool_calls == [{"index": 0, **call}] for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_sse_stream_keeps_alive_then_streams_then_done(make_proxy):
    release = asyncio.Event()
    upstream = FakeUpstream(block=release)
    proxy = make_proxy(upstream, n_support="no")
    task = asyncio.create_task(proxy.select(chat_request(), options()))
    asyncio.get_running_loop().call_later(0.05, release.set)
    events = [e async for e in sse_stream(task, include_usage=True, keepalive_s=0.01)]
    assert events[0] == KEEPALIVE and events[-1] == SSE_DONE
    data = [json.loads(e[len("data: ") :]) for e in events if e.startswith("data: {")]
    assert all(e in (KEEPALIVE, SSE_DONE) or e.startswith("data: {") for e in events)
    assert all(e.endswith("\n\n") for e in events)
    assert data[0]["object"] == "chat.completion.chunk"
    assert data[-1]["choices"] == [] and "usage" in data[-1]


async def test_sse_stream_reports_an_error_event(make_proxy):
    proxy = make_proxy(FakeUpstream(fail=fail_when(lambda _b: True)), n_support="no")
    task = asyncio.create_task(proxy.select(chat_request(), options()))
    events = [e async for e in sse_stream(task, keepalive_s=5)]
    assert events[-1] == SSE_DONE
    error = json.loads(events[-2][len("data: ") :])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "upstream_error"


async def test_sse_stream_hides_unknown_errors():
    async def broken() -> None:
        raise RuntimeError(f"internal detail {SECRET}")

    events = [e async for e in sse_stream(asyncio.ensure_future(broken()), keepalive_s=5)]
    error = json.loads(events[-2][len("data: ") :])["error"]
    assert error["type"] == "server_error" and SECRET not in events[-2]


async def test_content_parts_from_the_upstream_become_text(make_proxy):
    def parts(_body: dict, _index: int) -> httpx.Response:
        message = {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return httpx.Response(200, json={"model": "m", "choices": [choice]})

    selection = await make_proxy(FakeUpstream(fail=parts), n_support="no").select(
        chat_request(), options()
    )
    assert selection.best.text == "blue"
    assert build_response(selection).choices[0].message.content == "blue"
