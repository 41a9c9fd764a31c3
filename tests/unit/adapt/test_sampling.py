"""Collecting samples through the proxy's recipe and client: the plan, the seeds, the request
bodies, and resuming after a crash without asking the upstream twice for any answer it gave."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from adapt import sampling
from adapt.cache import SampleCache
from adapt.errors import AdaptError
from adapt.examples import Example
from service.upstream.recipe import PAPER_DECODINGS, Recipe
from tests.unit.adapt.fakes import BASE, MODEL, Crash, FakeUpstream, answer_text

EXAMPLES = [Example(f"e{i}", f"Question {i}?", ("alpha beta",), "t") for i in range(5)]


def _config(**overrides: object) -> sampling.SamplingConfig:
    values: dict[str, object] = {"model": MODEL, "samples_per_example": 4, "max_tokens": 8}
    values.update(overrides)
    return sampling.SamplingConfig(**values)  # type: ignore[arg-type]


def test_plan_decodings_round_robin_over_the_recipe() -> None:
    recipe = Recipe.default()
    full = sampling.plan_decodings(recipe, 17)
    assert [(d.name, k) for d, k in full] == [
        (d.name, k) for d in PAPER_DECODINGS for k in range(d.count)
    ]
    eight = Counter(d.name for d, _ in sampling.plan_decodings(recipe, 8))
    assert eight == {
        "sampling": 2,
        "temperature_0.9": 2,
        "top_k_40": 2,
        "top_p_0.95": 1,
        "greedy": 1,
    }
    assert sampling.plan_decodings(recipe, 0) == []
    with pytest.raises(AdaptError, match="between 0 and 17"):
        sampling.plan_decodings(recipe, 18)


def test_every_call_has_its_own_stable_seed() -> None:
    config = _config(samples_per_example=17)
    planned = sampling.plan(EXAMPLES, config)
    assert len(planned) == 5 * 17
    assert len({s.seed for s in planned}) == len(planned)
    assert [s.seed for s in sampling.plan(EXAMPLES, config)] == [s.seed for s in planned]
    other = sampling.plan(EXAMPLES, _config(samples_per_example=17, seed=1))
    assert {s.seed for s in other}.isdisjoint({s.seed for s in planned})


def test_request_bodies_follow_the_recipe() -> None:
    config = _config(samples_per_example=17, logprobs=True)
    by_name = {s.decoding.name: s for s in sampling.plan(EXAMPLES[:1], config)}
    top_k = sampling.build_body(by_name["top_k_40"], config)
    assert top_k == {
        "model": MODEL,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Question 0?"}],
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 40,
        "seed": by_name["top_k_40"].seed,
        "logprobs": True,
        "top_logprobs": 1,
    }
    greedy = sampling.build_body(by_name["greedy"], config)
    assert greedy["temperature"] == 0.0 and "top_p" not in greedy
    no_top_k = _config(samples_per_example=17, send_top_k=False, endpoint="completions")
    body = sampling.build_body(by_name["top_k_40"], no_top_k)
    assert "top_k" not in body and body["prompt"] == "Question 0?" and "logprobs" not in body
    assert sampling.instruction_for(EXAMPLES[0], "chat") == "Question 0?"


def test_answers_are_parsed_with_their_logprobs() -> None:
    fake = FakeUpstream()
    sample = sampling.plan(EXAMPLES[:1], _config())[0]
    for endpoint, path in (("chat", "/v1/chat/completions"), ("completions", "/v1/completions")):
        body = sampling.build_body(sample, _config(logprobs=True, endpoint=endpoint))
        _, payload = fake.respond(path, body)
        record = sampling.parse_answer(sample, payload, endpoint)  # type: ignore[arg-type]
        assert record.text == answer_text(sample.seed)
        assert record.key == ("e0", sample.decoding.name, sample.seed)
        assert record.logprobs is not None
        # The completions answer's first value is null, as some servers send: left out.
        expected = len(record.text.split()) - (endpoint == "completions")
        assert len(record.logprobs) == expected


async def _collect(
    fake: FakeUpstream, cache_path: Path, config: sampling.SamplingConfig, **kwargs: object
) -> sampling.CollectStats:
    planned = sampling.plan(EXAMPLES, config)
    async with sampling.make_client(BASE, transport=fake.transport()) as client:
        with SampleCache(cache_path, config.header()) as cache:
            return await sampling.collect(
                planned,
                client,
                cache,
                config,
                progress=False,
                **kwargs,  # type: ignore[arg-type]
            )


def test_resume_after_a_crash_asks_nothing_twice(tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"
    config = _config()
    crashing = FakeUpstream(crash_after=7)
    with pytest.raises(Crash):
        asyncio.run(_collect(crashing, cache, config))
    assert crashing.answered == 7
    resumed = FakeUpstream()
    stats = asyncio.run(_collect(resumed, cache, config))
    assert (stats.planned, stats.cached, stats.fetched) == (20, 7, 13)
    # Across both runs every planned call was answered exactly once.
    both = crashing.calls + resumed.calls
    assert len(both) == 20 and set(both.values()) == {1}
    # A third run has nothing left to ask.
    idle = FakeUpstream()
    assert asyncio.run(_collect(idle, cache, config)).fetched == 0
    assert idle.bodies == []


def test_resume_after_a_torn_write_asks_only_the_torn_sample_again(tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"
    config = _config()
    first = FakeUpstream(crash_after=6)
    with pytest.raises(Crash):
        asyncio.run(_collect(first, cache, config))
    lines = cache.read_bytes().splitlines(keepends=True)
    torn = json.loads(lines[-1])
    cache.write_bytes(b"".join(lines[:-1]) + lines[-1][:30])  # the last answer, half written
    second = FakeUpstream()
    stats = asyncio.run(_collect(second, cache, config))
    assert (stats.cached, stats.fetched) == (5, 15)
    repeated = [key for key, n in (first.calls + second.calls).items() if n > 1]
    assert repeated == [(f"Question {torn['example_id'][1:]}?", torn["seed"])]


def test_failed_calls_are_not_cached_and_asked_again(tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"
    config = _config()
    planned = sampling.plan(EXAMPLES, config)
    bad = {planned[3].seed, planned[11].seed}
    failing = FakeUpstream(fail=lambda body: 400 if body["seed"] in bad else None)
    stats = asyncio.run(_collect(failing, cache, config))
    assert stats.fetched == 18 and sorted(k[2] for k, _ in stats.failed) == sorted(bad)
    retry = FakeUpstream()
    assert asyncio.run(_collect(retry, cache, config)).fetched == 2
    assert {b["seed"] for b in retry.bodies} == bad


def test_too_many_failures_stop_the_run(tmp_path: Path) -> None:
    down = FakeUpstream(fail=lambda _body: 400)
    with pytest.raises(AdaptError, match="4 upstream calls failed"):
        asyncio.run(_collect(down, tmp_path / "cache.jsonl", _config(), max_failures=3))
    assert len(down.bodies) == 4


def test_concurrent_collection_caches_every_answer_once(tmp_path: Path) -> None:
    fake = FakeUpstream()
    cache = tmp_path / "cache.jsonl"
    stats = asyncio.run(_collect(fake, cache, _config(), concurrency=4))
    assert stats.fetched == 20 and set(fake.calls.values()) == {1}
    assert len(cache.read_text().splitlines()) == 21


def test_the_model_defaults_to_the_first_listed() -> None:
    async def resolve() -> tuple[str, str]:
        async with sampling.make_client(BASE, transport=FakeUpstream().transport()) as client:
            return (
                await sampling.resolve_model(client, None),
                await sampling.resolve_model(client, "mine"),
            )

    assert asyncio.run(resolve()) == (MODEL, "mine")
