"""Admission to the batcher's queue (service/engine/admission.py): the pace estimate, the
expected-wait and token caps, the oldest pair's age, refusing a request that would miss its
deadline, and Retry-After. Driven through DynamicBatcher with the fakes of test_batcher.py, and
the pace on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import numpy as np
import pytest

from service.engine.admission import Pace
from service.engine.errors import Overloaded, RequestTooLarge
from tests.unit.engine.fakes import (
    FakeScorer,
    encode,
    hold_model,
    metric,
    pair,
    queue_request,
    running,
)


class PacedScorer(FakeScorer):
    """Takes `seconds_per_token` per real token of a batch: a model of known pace."""

    def __init__(self, seconds_per_token: float) -> None:
        super().__init__()
        self.seconds_per_token = seconds_per_token

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        time.sleep(self.seconds_per_token * int(feeds["attention_mask"].sum()))
        return super().infer(feeds)


async def test_admission_is_bounded_by_the_expected_wait_not_by_request_size() -> None:
    scorer = PacedScorer(seconds_per_token=0.001)  # at most 1,000 tokens/s
    limit = 0.2
    async with running(scorer, max_wait_ms=0, max_queue_wait_s=limit) as batcher:
        assert batcher.expected_wait() is None  # no pace known yet: the token cap alone
        await batcher.score([pair(10)] * 10)
        pace = batcher.stats().tokens_per_second
        assert pace is not None and 300 < pace <= 1000
        first = await hold_model(batcher, scorer)
        admitted = await queue_request(batcher, [pair(10)] * int(0.15 * pace / 10))
        wait = batcher.expected_wait()
        assert wait is not None and 0.1 < wait < limit and not batcher.is_overloaded()
        more = await queue_request(batcher, [pair(10)] * int(0.1 * pace / 10))
        wait = batcher.expected_wait()
        assert wait is not None and wait > limit and batcher.is_overloaded()
        started = time.monotonic()
        with pytest.raises(Overloaded) as refused:
            await batcher.score([pair(10)])  # small, but behind too long a queue
        assert time.monotonic() - started < 0.1
        # Honest: how long until the queue is back under the limit.
        assert refused.value.retry_after == pytest.approx(wait - limit, abs=0.1)
        scorer.release()
        await asyncio.gather(first, admitted, more)

        # An empty queue admits a request whose own scoring takes longer than the wait limit:
        # size alone never refuses (large requests are not starved).
        big = [pair(50)] * int(2 * limit * pace / 50)
        assert batcher.expected_wait(sum(len(encode([p])[0].input_ids) for p in big)) > limit
        assert len(await batcher.score(big)) == len(big)


async def test_a_queue_older_than_the_wait_limit_refuses_whatever_the_estimate() -> None:
    """When the model slows down (a busy host), the pace lags: the age of the oldest queued
    pair is the check on the estimate."""
    scorer = PacedScorer(seconds_per_token=0.0001)  # a fast pace first
    async with running(scorer, max_wait_ms=0, max_queue_wait_s=0.2) as batcher:
        await batcher.score([pair(10)] * 10)
        first = await hold_model(batcher, scorer)  # then the model stalls
        queued = await queue_request(batcher, [pair(10)])
        wait = batcher.expected_wait()
        assert wait is not None and wait < 0.05  # the estimate still says "no wait"
        assert not batcher.is_overloaded()
        await asyncio.sleep(0.3)  # ... but that pair has now waited past the limit
        assert batcher.is_overloaded()
        with pytest.raises(Overloaded) as refused:
            await batcher.score([pair(10)])
        assert refused.value.retry_after >= 0.1
        scorer.release()
        await asyncio.gather(first, queued)
        assert not batcher.is_overloaded()


async def test_a_request_that_would_miss_its_deadline_behind_the_queue_is_refused_at_once() -> None:
    scorer = PacedScorer(seconds_per_token=0.001)
    async with running(scorer, max_wait_ms=0, max_queue_wait_s=10.0) as batcher:
        await batcher.score([pair(10)] * 10)
        pace = batcher.stats().tokens_per_second
        assert pace is not None
        first = await hold_model(batcher, scorer)
        queued = await queue_request(batcher, [pair(10)] * int(0.3 * pace / 10))
        wait = batcher.expected_wait()
        assert wait is not None and wait > 0.25
        with pytest.raises(Overloaded) as refused:
            await batcher.score([pair(10)], deadline=time.monotonic() + 0.1)
        assert refused.value.retry_after == pytest.approx(wait - 0.1, abs=0.1)
        # The same request with room for the queue is admitted.
        patient = await queue_request(batcher, [pair(10)], deadline=time.monotonic() + 30)
        scorer.release()
        await asyncio.gather(first, queued, patient)


async def test_overload_is_refused_at_once_with_retry_after() -> None:
    scorer = FakeScorer()
    rejected = metric("cappy_requests_rejected_total", reason="overloaded")
    async with running(scorer, max_queue_tokens=60) as batcher:
        first = await hold_model(batcher, scorer)  # running, so no longer queued
        queued = await queue_request(batcher, [pair(10)] * 5)
        assert batcher.queue_tokens == 50 and not batcher.is_overloaded()

        started = time.monotonic()
        with pytest.raises(Overloaded) as refused:
            await batcher.score([pair(10)] * 2)
        assert time.monotonic() - started < 0.5
        assert refused.value.retry_after > 0

        # Never fits, however empty the queue: not worth a retry, so not Overloaded.
        with pytest.raises(RequestTooLarge) as too_large:
            await batcher.score([pair(10)] * 7)
        assert too_large.value.tokens == 70 and too_large.value.limit == 60

        last = await queue_request(batcher, [pair(10)])  # exactly fills the queue
        assert batcher.is_overloaded()
        with pytest.raises(Overloaded):
            await batcher.score([pair(5)])  # refused before tokenization

        scorer.release()
        await asyncio.gather(first, queued, last)
        assert not batcher.is_overloaded()
        assert len(await batcher.score([pair(10)] * 6)) == 6
    assert metric("cappy_requests_rejected_total", reason="overloaded") == rejected + 2


async def test_retry_after_follows_measured_throughput() -> None:
    scorer = FakeScorer()
    async with running(scorer, max_queue_tokens=100) as batcher:
        await batcher.score([pair(50)] * 2)  # measures a throughput
        first = await hold_model(batcher, scorer)
        await queue_request(batcher, [pair(50)] * 2)
        with pytest.raises(Overloaded) as refused:
            await batcher.score([pair(50)])
        assert 0 < refused.value.retry_after <= 60
        scorer.release()
        await first


async def test_a_request_that_alone_outlasts_its_deadline_is_too_large() -> None:
    scorer = PacedScorer(seconds_per_token=0.001)
    async with running(scorer, max_wait_ms=0) as batcher:
        await batcher.score([pair(10)] * 10)
        pace = batcher.stats().tokens_per_second
        assert pace is not None
        tokens = int(2 * pace)  # about two seconds of model time
        started = time.monotonic()
        with pytest.raises(RequestTooLarge, match="more than its 1 s deadline") as refused:
            await batcher.score([pair(50)] * (tokens // 50), deadline=started + 1.0)
        assert time.monotonic() - started < 0.5  # refused at once, nothing scored
        assert 0 < refused.value.limit < refused.value.tokens
        assert len(scorer.batches) == 1  # only the pace-setting batch ever ran


# --- the pace on its own -------------------------------------------------------------------------


def test_the_first_batch_sets_the_pace_and_later_ones_move_it_by_a_fifth() -> None:
    pace = Pace()
    assert pace.tokens_per_second() is None
    pace.track(100, started=0.0, finished=1.0)
    assert pace.tokens_per_second() == pytest.approx(100.0)
    pace.track(300, started=1.0, finished=2.0)  # 300 tokens in 1 s
    assert pace.tokens_per_second() == pytest.approx((100 + 0.2 * 200) / 1.0)


def test_overlapping_batches_count_their_busy_time_once() -> None:
    """Two streams: a batch that ran beside another is busy only from the last completion."""
    pace = Pace()
    pace.track(100, started=0.0, finished=1.0)
    pace.track(100, started=0.5, finished=1.5)  # busy 1.0 -> 1.5 only
    assert pace.tokens_per_second() == pytest.approx(100 / (1.0 + 0.2 * (0.5 - 1.0)))


def test_an_idle_gap_is_not_counted_as_busy() -> None:
    pace = Pace()
    pace.track(100, started=0.0, finished=1.0)
    pace.idle()
    pace.track(100, started=5.0, finished=6.0)  # busy 5.0 -> 6.0, not 1.0 -> 6.0
    assert pace.tokens_per_second() == pytest.approx(100.0)
    pace.track(100, started=5.0, finished=7.0)  # no idle(): from the last completion, 6.0
    assert pace.tokens_per_second() == pytest.approx(100.0)
