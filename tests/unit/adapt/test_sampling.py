"""Collecting samples through the proxy's client: parsing the answers, and resuming after a crash
without asking the upstream twice for any answer it gave."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from adapt import planning, sampling
from adapt.cache import SampleCache
from adapt.errors import AdaptError
from tests.unit.adapt.fakes import (
    BASE,
    EXAMPLES,
    MODEL,
    Crash,
    FakeUpstream,
    answer_text,
    sampling_config,
)


def test_answers_are_parsed_with_their_logprobs() -> None:
    fake = FakeUpstream()
    sample = planning.plan(EXAMPLES[:1], sampling_config())[0]
    for endpoint, path in (("chat", "/v1/chat/completions"), ("completions", "/v1/completions")):
        body = planning.build_body(sample, sampling_config(logprobs=True, endpoint=endpoint))
        _, payload = fake.respond(path, body)
        record = sampling.parse_answer(sample, payload, endpoint)  # type: ignore[arg-type]
        assert record.text == answer_text(sample.seed)
        assert record.key == ("e0", sample.decoding.name, sample.seed)
        assert record.logprobs is not None
        # The completions answer's first value is null, as some servers send: left out.
        expected = len(record.text.split()) - (endpoint == "completions")
        assert len(record.logprobs) == expected


async def _collect(
    fake: FakeUpstream, cache_path: Path, config: planning.SamplingConfig, **kwargs: object
) -> sampling.CollectStats:
    planned = planning.plan(EXAMPLES, config)
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


def _crashed(answers: int, cache: Path, config: planning.SamplingConfig) -> FakeUpstream:
    """The upstream of a collection that crashed after `answers` answers."""
    crashing = FakeUpstream(crash_after=answers)
    with pytest.raises(Crash):
        asyncio.run(_collect(crashing, cache, config))
    return crashing


def test_resume_after_a_crash_asks_nothing_twice(tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"
    config = sampling_config()
    crashing = _crashed(7, cache, config)
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
    config = sampling_config()
    first = _crashed(6, cache, config)
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
    config = sampling_config()
    planned = planning.plan(EXAMPLES, config)
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
        asyncio.run(_collect(down, tmp_path / "cache.jsonl", sampling_config(), max_failures=3))
    assert len(down.bodies) == 4


def test_concurrent_collection_caches_every_answer_once(tmp_path: Path) -> None:
    fake = FakeUpstream()
    cache = tmp_path / "cache.jsonl"
    stats = asyncio.run(_collect(fake, cache, sampling_config(), concurrency=4))
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
