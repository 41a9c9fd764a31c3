"""Admission to the batcher's queue (service/engine/admission.py): the pace estimate and when it
counts, the expected-wait and token caps, the oldest pair's age, refusing a request that would
miss its deadline, and Retry-After. Driven through DynamicBatcher with the fakes of fakes.py, and
the pace, the head's lag and admission on their own.

Time is a `FakeClock` that only the tests and the `PacedScorer` move: every pace, wait, age and
Retry-After below is exact, however busy the host. "Refused at once" is shown by counted events:
the refusal comes while the model is held, so it cannot have waited for it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from service.engine.admission import (
    LAG_QUANTILE,
    MIN_PACE_BATCHES,
    Admission,
    HeadLag,
    Pace,
)
from service.engine.errors import Overloaded, RequestTooLarge
from service.engine.queue import Item, PairQueue, QueuedRequest
from service.engine.types import EncodedPair
from tests.unit.engine.fakes import (
    FakeClock,
    FakeScorer,
    PacedScorer,
    encode,
    eventually,
    expected_score,
    hold_model,
    measure_pace,
    metric,
    overloaded,
    pace,
    pair,
    pending_requests,
    queue_request,
    queued_work,
    running,
)


async def test_admission_is_bounded_by_the_expected_wait_not_by_request_size() -> None:
    clock = FakeClock()
    # 10 tokens/s: a queue of a few short pairs is seconds of work, and never a full batch,
    # which the batcher would take off the queue behind the held one.
    scorer = PacedScorer(clock, seconds_per_token=0.1)
    limit = 10.0
    async with running(scorer, clock=clock, max_wait_ms=0, max_queue_wait_s=limit) as batcher:
        assert batcher.expected_wait() is None  # no pace known yet: the token cap alone
        pace = await measure_pace(batcher)
        assert pace == pytest.approx(10.0)
        first = await hold_model(batcher, scorer)
        admitted = await queue_request(batcher, [pair(15)] * 5)
        wait = batcher.expected_wait()
        assert wait == pytest.approx(7.5) and not overloaded(batcher)
        more = await queue_request(batcher, [pair(10)] * 5)
        wait = batcher.expected_wait()
        assert wait is not None and wait == pytest.approx(12.5) and overloaded(batcher)
        tokens, batches = queued_work(batcher)[1], len(scorer.batches)
        with pytest.raises(Overloaded) as refused:
            await batcher.score([pair(10)])  # small, but behind too long a queue
        # At once: the model is still held, nothing was queued or run.
        assert (queued_work(batcher)[1], len(scorer.batches)) == (tokens, batches)
        # Honest: how long until the queue is back under the limit.
        assert refused.value.retry_after == pytest.approx(wait - limit)
        scorer.release()
        await asyncio.gather(first, admitted, more)

        # An empty queue admits a request whose own scoring takes longer than the wait limit:
        # size alone never refuses (large requests are not starved).
        big = [pair(50)] * int(2 * limit * pace / 50)
        own = batcher.expected_wait(sum(len(encode([p])[0].input_ids) for p in big))
        assert own is not None and own > limit
        assert len(await batcher.score(big)) == len(big)


async def test_a_queue_older_than_the_wait_limit_refuses_whatever_the_estimate() -> None:
    """When the model slows down (a busy host), the pace lags: the age of the oldest queued
    pair is the check on the estimate."""
    clock = FakeClock()
    scorer = PacedScorer(clock, seconds_per_token=0.0001)  # a fast pace first
    limit = 10.0
    async with running(scorer, clock=clock, max_wait_ms=0, max_queue_wait_s=limit) as batcher:
        await measure_pace(batcher)
        first = await hold_model(batcher, scorer)  # then the model stalls
        queued = await queue_request(batcher, [pair(10)])
        wait = batcher.expected_wait()
        assert wait is not None and wait < 0.01  # the estimate still says "no wait"
        assert not overloaded(batcher)
        clock.advance(limit + 1.5)  # ... but that pair has now waited past the limit
        assert overloaded(batcher)
        with pytest.raises(Overloaded) as refused:
            await batcher.score([pair(10)])
        assert refused.value.retry_after == pytest.approx(1.5)
        scorer.release()
        await asyncio.gather(first, queued)
        assert not overloaded(batcher)


async def test_before_the_pace_is_known_only_the_cap_and_the_oldest_age_refuse() -> None:
    clock = FakeClock()
    scorer = PacedScorer(clock, seconds_per_token=1.0)  # a very slow first batch
    limit = 10.0
    async with running(
        scorer, clock=clock, max_wait_ms=0, max_queue_wait_s=limit, max_queue_tokens=1_000
    ) as batcher:
        await batcher.score([pair(10)])  # 10 s for 10 tokens: not a pace to refuse by
        first = await hold_model(batcher, scorer)
        queued = await queue_request(batcher, [pair(100)] * 9)  # 900 tokens: "900 s" at 1/s
        assert batcher.expected_wait() is None and not overloaded(batcher)
        with pytest.raises(Overloaded) as full:
            await batcher.score([pair(101)])  # past the memory cap
        assert full.value.retry_after == pytest.approx(1.0)  # no pace to say when
        clock.advance(limit + 0.5)  # the oldest queued pair has waited past the limit
        with pytest.raises(Overloaded) as old:
            await batcher.score([pair(10)])
        assert old.value.retry_after == pytest.approx(1.0)
        scorer.release()
        await asyncio.gather(first, queued)


async def test_a_request_that_would_miss_its_deadline_behind_the_queue_is_refused_at_once() -> None:
    clock = FakeClock()
    scorer = PacedScorer(clock, seconds_per_token=0.1)  # 10 tokens/s
    async with running(scorer, clock=clock, max_wait_ms=0, max_queue_wait_s=10.0) as batcher:
        pace = await measure_pace(batcher)
        first = await hold_model(batcher, scorer)
        queued = await queue_request(batcher, [pair(10)] * 3)
        wait = batcher.expected_wait()
        assert wait is not None and wait == pytest.approx(3.0)
        with pytest.raises(Overloaded) as refused:
            await batcher.score([pair(5)], deadline=clock() + 1.0)
        # The queue's wait plus its own 5 tokens, past its 1 s.
        assert refused.value.retry_after == pytest.approx(wait + 5 / pace - 1.0)
        # The same request with room for the queue is admitted.
        patient = await queue_request(batcher, [pair(10)], deadline=clock() + 30)
        scorer.release()
        await asyncio.gather(first, queued, patient)


async def test_overload_is_refused_at_once_with_retry_after() -> None:
    clock = FakeClock()
    scorer = FakeScorer()
    rejected = metric("cappy_requests_rejected_total", reason="overloaded")
    async with running(scorer, clock=clock, max_wait_ms=0, max_queue_tokens=60) as batcher:
        first = await hold_model(batcher, scorer)  # running, so no longer queued
        queued = await queue_request(batcher, [pair(10)] * 5)
        assert queued_work(batcher)[1] == 50 and not overloaded(batcher)

        with pytest.raises(Overloaded) as refused:
            await batcher.score([pair(10)] * 2)
        assert refused.value.retry_after > 0
        assert queued_work(batcher)[1] == 50 and len(scorer.batches) == 1  # at once: model held

        # Never fits, however empty the queue: not worth a retry, so not Overloaded.
        with pytest.raises(RequestTooLarge) as too_large:
            await batcher.score([pair(10)] * 7)
        assert too_large.value.tokens == 70 and too_large.value.limit == 60

        last = await queue_request(batcher, [pair(10)])  # exactly fills the queue
        assert overloaded(batcher)
        with pytest.raises(Overloaded):
            await batcher.score([pair(5)])  # refused before tokenization

        scorer.release()
        await asyncio.gather(first, queued, last)
        assert not overloaded(batcher)
        assert len(await batcher.score([pair(10)] * 6)) == 6
    assert metric("cappy_requests_rejected_total", reason="overloaded") == rejected + 2


@pytest.mark.parametrize("seconds_per_token", [0.01, 0.02])
async def test_retry_after_follows_measured_throughput(seconds_per_token: float) -> None:
    clock = FakeClock()
    scorer = PacedScorer(clock, seconds_per_token=seconds_per_token)
    async with running(
        scorer, clock=clock, max_wait_ms=0, max_queue_tokens=200, max_batch_tokens=256
    ) as batcher:
        pace = await measure_pace(batcher)
        assert pace == pytest.approx(1 / seconds_per_token)
        first = await hold_model(batcher, scorer)
        await queue_request(batcher, [pair(50)] * 3)
        with pytest.raises(Overloaded) as refused:
            await batcher.score([pair(100)])
        # 50 tokens over the cap: the time the model needs to make room for them.
        assert refused.value.retry_after == pytest.approx(50 / pace)
        scorer.release()
        await first


async def test_a_request_that_alone_outlasts_its_deadline_is_too_large() -> None:
    clock = FakeClock()
    scorer = PacedScorer(clock, seconds_per_token=0.001)
    async with running(scorer, clock=clock, max_wait_ms=0) as batcher:
        pace = await measure_pace(batcher)
        ran = len(scorer.batches)
        tokens = int(2 * pace)  # two seconds of model time
        with pytest.raises(RequestTooLarge, match="more than its 1 s deadline") as refused:
            await batcher.score([pair(50)] * (tokens // 50), deadline=clock() + 1.0)
        assert 0 < refused.value.limit < refused.value.tokens
        assert len(scorer.batches) == ran  # refused at once: nothing of it scored


# --- a fresh batcher ----------------------------------------------------------------------------


class FirstRunSlowScorer(PacedScorer):
    """Its first batch takes `first_s` (a shape's first run, on cores busy tokenizing the
    requests beside it); every later one `seconds_per_token` a token."""

    def __init__(self, clock: FakeClock, first_s: float) -> None:
        super().__init__(clock, seconds_per_token=0.0001)
        self.first_s = first_s

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        if not self.batches:
            self.clock.advance(self.first_s)
        return super().infer(feeds)


async def test_a_fresh_batcher_admits_a_burst_of_16_whatever_its_first_batch_took() -> None:
    """The field report: 16 concurrent requests to a server just turned ready got 6 x 429
    ("retry in 9 s"). One request's pairs made the first batch, alone and slow, while the
    others were still being tokenized; that batch's pace alone said the queue behind it would
    take minutes. The burst here arrives in that order, by events: the first request's batch
    completes before the other 15 finish tokenizing, and the model holds the next batch while
    they queue."""
    clock = FakeClock()
    scorer = FirstRunSlowScorer(clock, first_s=5.0)  # 80 tokens in 5 s: "16 tokens/s"
    tokenized = threading.Event()
    calls = 0
    lock = threading.Lock()

    def encoder(pairs: Sequence[tuple[str, str]]) -> list[EncodedPair]:
        nonlocal calls
        with lock:
            calls += 1
            first = calls == 1
        if not first:  # the other 15 finish tokenizing after the first batch
            assert tokenized.wait(60), "the test never let the burst through"
        return encode(pairs)

    requests = [[pair(10, marker=100 + r)] * 8 for r in range(16)]
    async with running(scorer, clock=clock, encoder=encoder, max_wait_ms=0) as batcher:
        tasks = [asyncio.create_task(batcher.score(pairs)) for pairs in requests]
        await eventually(lambda: any(t.done() for t in tasks))  # the first batch's request
        scorer.hold()
        tokenized.set()
        # Each of the 15 is now admitted (pending) or refused (done).
        await eventually(lambda: sum(t.done() for t in tasks) + pending_requests(batcher) == 16)
        refused = [t.exception() for t in tasks if t.done() and t.exception() is not None]
        assert refused == []
        assert batcher.expected_wait() is None  # one batch is not a pace to refuse by
        scorer.release()
        results = await asyncio.gather(*tasks)
    assert [[s.score for s in r] for r in results] == [
        [expected_score(p) for p in pairs] for pairs in requests
    ]


async def test_batches_tell_admission_how_long_their_oldest_pairs_waited() -> None:
    """The model stalls 10 s with pairs queued that the pace said would wait 1.7-6.8 s: each
    batch's seed reports its wait, and the expected wait grows by the head's lag, which
    /metrics shows (cappy_queue_head_lag)."""
    clock = FakeClock()
    scorer = PacedScorer(clock, seconds_per_token=0.1)
    async with running(
        scorer, clock=clock, max_wait_ms=0, max_batch_size=1, max_batch_tokens=256
    ) as batcher:
        await measure_pace(batcher)
        assert batcher.head_lag == 1.0 and metric("cappy_queue_head_lag") == 1.0
        first = await hold_model(batcher, scorer)
        queued = await queue_request(batcher, [pair(15)] * 5)
        clock.advance(10.0)
        scorer.release()
        await asyncio.gather(first, queued)
        factor = batcher.head_lag
        assert factor > 1.0 and metric("cappy_queue_head_lag") == factor  # read at scrape time
        assert batcher.expected_wait(100) == pytest.approx(100 / pace(batcher) * factor)
    assert metric("cappy_queue_head_lag") == 1.0  # no batcher runs


# --- the pace and admission on their own --------------------------------------------------------


def test_the_pace_is_unknown_until_enough_work_then_moves_by_a_fifth() -> None:
    pace = Pace(min_tokens=1_000, min_batches=4)
    assert pace.tokens_per_second() is None
    t = 0.0
    for tokens in (10, 400, 390):  # three batches: too few
        pace.track(tokens, started=t, finished=t + 1.0)
        t += 1.0
        assert pace.tokens_per_second() is None
    pace.track(200, started=t, finished=t + 1.0)  # the fourth brings it to 1,000 tokens
    assert pace.tokens_per_second() == pytest.approx(1_000 / 4.0)  # all of it, averaged
    pace.track(500, started=t + 1.0, finished=t + 2.0)
    assert pace.tokens_per_second() == pytest.approx(250 + 0.2 * (500 - 250))


def test_the_pace_waits_for_enough_tokens_however_many_batches() -> None:
    pace = Pace(min_tokens=1_000, min_batches=2)
    for i in range(9):  # 900 tokens in 9 batches, back to back
        pace.track(100, started=i * 0.5, finished=(i + 1) * 0.5)
        assert pace.tokens_per_second() is None
    pace.track(100, started=4.5, finished=5.0)
    assert pace.tokens_per_second() == pytest.approx(200.0)


def test_overlapping_batches_count_their_busy_time_once() -> None:
    """Two streams: a batch that ran beside another is busy only from the last completion."""
    pace = Pace(min_batches=1)
    pace.track(100, started=0.0, finished=1.0)
    pace.track(100, started=0.5, finished=1.5)  # busy 1.0 -> 1.5 only
    assert pace.tokens_per_second() == pytest.approx(100 / (1.0 + 0.2 * (0.5 - 1.0)))


def test_an_idle_gap_is_not_counted_as_busy() -> None:
    pace = Pace(min_batches=1)
    pace.track(100, started=0.0, finished=1.0)
    pace.idle()
    pace.track(100, started=5.0, finished=6.0)  # busy 5.0 -> 6.0, not 1.0 -> 6.0
    assert pace.tokens_per_second() == pytest.approx(100.0)
    pace.track(100, started=5.0, finished=7.0)  # no idle(): from the last completion, 6.0
    assert pace.tokens_per_second() == pytest.approx(100.0)


def test_after_an_idle_spell_busy_time_counts_from_the_first_batch_handed_to_the_model() -> None:
    """Two streams after an idle spell: the batch handed over first (at 10.0) finishes after
    one handed over later (its worker started at 12.0, finished at 14.0): 4 s of busy time for
    both, not the 2 s of the one tracked first."""
    pace = Pace(min_batches=2)
    pace.idle()
    pace.begin(10.0)
    pace.begin(12.0)  # the model is busy already: no new mark
    pace.track(2_000, started=12.0, finished=14.0)
    pace.track(2_000, started=10.0, finished=14.0)
    assert pace.tokens_per_second() == pytest.approx(1_000.0)


def test_a_gap_while_work_waited_is_counted() -> None:
    """No idle() between two batches (pairs were queued; the next batch was formed late, e.g.
    behind a busy event loop): the gap is part of how fast the queue drains."""
    pace = Pace(min_batches=1)
    pace.track(100, started=0.0, finished=1.0)
    pace.track(100, started=3.0, finished=4.0)  # busy 1.0 -> 4.0
    assert pace.tokens_per_second() == pytest.approx(100 / (1.0 + 0.2 * (3.0 - 1.0)))


def _expire(request: QueuedRequest) -> None:
    request.done = True


def _admission(clock: FakeClock, min_pace_tokens: int) -> tuple[Admission, PairQueue]:
    queue = PairQueue(
        max_batch_tokens=min_pace_tokens,
        max_batch_size=64,
        padding_tolerance=0.1,
        pad_to_multiple=8,
        max_length=512,
        cross_request=True,
        expire=_expire,
    )
    admission = Admission(
        queue,
        max_queue_tokens=400_000,
        max_queue_wait_s=10.0,
        default_timeout_s=60.0,
        min_pace_tokens=min_pace_tokens,
        clock=clock,
    )
    return admission, queue


def _admit(admission: Admission, queue: PairQueue, pairs: int, length: int) -> None:
    encoded = encode([pair(length)] * pairs)
    tokens = pairs * length
    deadline = admission.deadline(None)
    now = admission.admit(tokens, deadline)
    request = QueuedRequest(encoded, tokens, deadline)
    request.pace = admission.pace.tokens_per_second()  # as the batcher does
    queue.add(request, now)


def test_admission_refuses_by_the_expected_wait_only_on_a_measured_pace() -> None:
    """Synthetic batch timings: one small, slow first batch (16 tokens in 2 s) must not make a
    deep queue refuse; once a batch budget of work over `MIN_PACE_BATCHES` batches has run,
    the same queue does."""
    clock = FakeClock()
    admission, queue = _admission(clock, min_pace_tokens=8192)
    admission.pace.track(16, started=clock(), finished=clock() + 2.0)  # "8 tokens/s"
    clock.advance(2.0)
    for _ in range(15):
        _admit(admission, queue, pairs=8, length=64)  # 7,680 tokens: "16 minutes" at 8/s
    assert admission.expected_wait() is None and admission.retry_after(0) is None

    # Real work: full batches of 2,800 tokens, 1 s each; the sum passes 8,192 at the fourth.
    for batch in range(1, MIN_PACE_BATCHES):
        admission.pace.idle()
        admission.pace.track(2_800, started=clock(), finished=clock() + 1.0)
        clock.advance(1.0)
        assert (admission.pace.tokens_per_second() is None) == (batch < MIN_PACE_BATCHES - 1)
    runs = MIN_PACE_BATCHES - 1
    pace = (16 + runs * 2_800) / (2.0 + runs * 1.0)
    assert admission.pace.tokens_per_second() == pytest.approx(pace)
    assert admission.expected_wait() == pytest.approx(queue.tokens / pace)
    _admit(admission, queue, pairs=160, length=64)  # the queue ahead is under 10 s: admitted
    assert queue.tokens / pace > 10.0
    with pytest.raises(Overloaded) as refused:
        _admit(admission, queue, pairs=1, length=64)
    assert refused.value.retry_after == pytest.approx(queue.tokens / pace - 10.0)


def _known_pace(admission: Admission, clock: FakeClock, tokens_per_second: float) -> None:
    """Gives `admission` a measured pace of `tokens_per_second`."""
    for _ in range(MIN_PACE_BATCHES):
        admission.pace.idle()
        admission.pace.track(int(tokens_per_second), started=clock(), finished=clock() + 1.0)
    assert admission.pace.tokens_per_second() == pytest.approx(tokens_per_second)


def test_the_head_lag_settles_at_a_high_quantile_of_the_seeds_ratios() -> None:
    lag = HeadLag()
    lag.observe(waited=20.0, predicted=0.5)  # too short a prediction to say anything
    assert lag.factor == 1.0
    lag.observe(waited=3.0, predicted=6.0)  # waited less: the factor never goes below 1
    assert lag.factor == 1.0
    ratios = [1.0 + i / 20 for i in range(21)]  # seeds waited 1x to 2x their prediction
    for _ in range(100):
        for ratio in ratios:
            lag.observe(waited=10.0 * ratio, predicted=10.0)
    below = sum(ratio <= lag.factor for ratio in ratios) / len(ratios)
    assert below == pytest.approx(LAG_QUANTILE, abs=0.1)  # not the mean ratio, 1.5
    for _ in range(200):
        lag.observe(waited=100.0, predicted=1.0)  # a stalled model: up to the cap, no further
    assert lag.factor == pytest.approx(4.0)


def test_the_limit_holds_for_the_oldest_pairs_when_they_wait_longer_than_the_pace() -> None:
    """The pace says 7.2 s for the queue; batch seeds (the oldest pairs) have waited 1.5x what
    the pace of their admission said: the queue is 10.8 s, over the 10 s limit."""
    clock = FakeClock()
    admission, queue = _admission(clock, min_pace_tokens=100)
    _known_pace(admission, clock, 100.0)
    _admit(admission, queue, pairs=11, length=80)  # 880 tokens: 8.8 s at the pace
    assert admission.expected_wait() == pytest.approx(8.8) and admission.retry_after(0) is None

    seed = queue.take_batch(clock(), max_tokens=1)[0]
    # Behind its request's 10 other pairs (8 s at the pace), whatever their order: served
    # first, it waited less than predicted.
    assert seed.ahead == 800 and seed.request.pace == pytest.approx(100.0)
    admission.observe_seed(seed, started=clock() + 0.8)
    assert admission.lag.factor == 1.0
    assert queue.take_batch(clock(), max_tokens=1)  # a second pair served: 720 tokens left
    request = QueuedRequest(encode([pair(10)]), 10, None)
    request.pace = 100.0
    admission.observe_seed(  # predicted 2 s (200 tokens ahead at 100/s), waited 3 s
        Item(request, 0, request.encoded[0], 10, arrival=clock(), ahead=200),
        started=clock() + 3.0,
    )
    assert admission.lag.factor > 1.0
    admission.lag.factor = 1.5  # as if seeds had waited 1.5x their prediction for a while
    assert admission.lag.factor == pytest.approx(1.5) and queue.tokens == 720
    assert admission.expected_wait() == pytest.approx(1.5 * queue.tokens / 100.0)
    assert admission.model_time(queue.tokens) == pytest.approx(queue.tokens / 100.0)
    with pytest.raises(Overloaded) as refused:
        _admit(admission, queue, pairs=1, length=8)
    # 0.8 s over the limit; the queue drains 100 tokens a second, so the expected wait falls
    # 1.5 s a second: room in 0.53 s.
    excess = 1.5 * queue.tokens / 100.0 - 10.0
    assert refused.value.retry_after == pytest.approx(excess / 1.5)
    clock.advance(excess / 1.5)
    _drain(queue, clock, round(excess / 1.5 * 100.0))
    _admit(admission, queue, pairs=1, length=8)


def test_an_idle_server_refuses_a_request_alone_only_as_too_large() -> None:
    """With nothing queued, a request its deadline allows alone is admitted whatever the head's
    lag, which scales the queue ahead (later arrivals overtaking its oldest pairs), not the
    request's own work; one it does not allow is too large (413). A 429 there would be told
    again at every retry (a Cappy-large-shaped model served one request at a time refused a
    64-candidate one so, its own model time scaled by the lag past its 60 s)."""
    clock = FakeClock()
    admission, queue = _admission(clock, min_pace_tokens=100)
    _known_pace(admission, clock, 100.0)
    admission.lag.factor = 4.0
    deadline = admission.deadline(None)  # 60 s
    admission.admit(5_900, deadline)  # 59 s alone (x4: 236 s)
    with pytest.raises(RequestTooLarge):
        admission.admit(6_100, deadline)

    # Behind a queue, the lag counts for the queue: 2 s of model time is expected to take 8 s.
    _admit(admission, queue, pairs=2, length=100)
    admission.admit(5_200, deadline)  # 8 + 52 s
    with pytest.raises(Overloaded) as refused:
        admission.admit(5_300, deadline)  # 8 + 53 s: 1 s late, the queue's excess drains at 4x
    assert refused.value.retry_after == pytest.approx(1.0 / 4.0)


def test_a_lone_requests_pairs_served_by_length_do_not_raise_the_lag() -> None:
    """One request at a time: its pairs are served by length, not in the order they were sent,
    so a pair listed early may start after many listed later. That is its own request's work,
    not later arrivals overtaking it: the lag stays 1. (Counted against the pairs listed before
    it alone, these seeds raised it to 1.23, and it climbs with every such request: a burst
    that followed would be refused at 1/1.23 of the limit.)"""
    clock = FakeClock()
    admission, queue = _admission(clock, min_pace_tokens=100)
    _known_pace(admission, clock, 100.0)
    pairs = [pair(24)] + [pair(200)] * 20 + [pair(24)] * 30  # 4,744 tokens: 47 s alone
    for _ in range(10):
        encoded = encode(pairs)
        tokens = sum(p.length for p in encoded)
        deadline = admission.deadline(None)
        request = QueuedRequest(encoded, tokens, deadline)
        request.pace = admission.pace.tokens_per_second()
        queue.add(request, admission.admit(tokens, deadline))
        while batch := queue.take_batch(clock(), max_tokens=1_000):
            admission.observe_seed(batch[0], started=clock())
            clock.advance(sum(item.length for item in batch) / 100.0)
    assert admission.lag.factor == 1.0


def test_past_the_age_limit_retry_after_is_when_the_old_pairs_have_drained() -> None:
    """A burst admitted at once ages together: its oldest pair's excess age (0.5 s) says nothing
    of when the queue admits again; the time to drain it, oldest first, does."""
    clock = FakeClock()
    admission, queue = _admission(clock, min_pace_tokens=100)
    _known_pace(admission, clock, 100.0)
    for _ in range(9):
        _admit(admission, queue, pairs=1, length=100)  # 9 s of work, all at once
    clock.advance(10.5)  # the model stalled: nothing drained, every pair is past the limit
    assert admission.retry_after(0) == pytest.approx(9.0)

    # One request arrived 9 s later: once the burst's first pair has drained (1 s), the head
    # is 2.5 s old, under the limit.
    admission2, queue2 = _admission(clock, min_pace_tokens=100)
    _known_pace(admission2, clock, 100.0)
    _admit(admission2, queue2, pairs=1, length=100)
    clock.advance(9.0)
    _admit(admission2, queue2, pairs=1, length=100)
    clock.advance(1.5)
    assert admission2.retry_after(0) == pytest.approx(1.0)


def _admit_keyed(admission: Admission, queue: PairQueue, key: bytes, length: int) -> float:
    """`_admit` of one pair for a request whose content key is `key`; its Retry-After when it
    is refused (raises nothing then), 0 when it is admitted."""
    deadline = admission.deadline(None)
    try:
        now = admission.admit(length, deadline, key)
    except Overloaded as refused:
        return refused.retry_after
    request = QueuedRequest(encode([pair(length)]), length, deadline)
    request.pace = admission.pace.tokens_per_second()
    queue.add(request, now)
    return 0.0


def _eleven_seconds_queued(clock: FakeClock) -> tuple[Admission, PairQueue]:
    """Admission at 100 tokens/s with a 10 s limit and 11 s of work queued (11 x 100 tokens)."""
    admission, queue = _admission(clock, min_pace_tokens=100)
    _known_pace(admission, clock, 100.0)
    for _ in range(11):
        _admit(admission, queue, pairs=1, length=100)
    return admission, queue


def _drain(queue: PairQueue, clock: FakeClock, tokens: int) -> None:
    """The model takes `tokens` tokens' worth of the oldest pairs off the queue."""
    target = queue.tokens - tokens
    while queue.tokens > target:
        assert queue.take_batch(clock(), max_tokens=1)


def test_a_refusals_retry_after_is_a_promise_the_queue_keeps() -> None:
    """100 tokens/s, a 10 s limit, a queue of 11 s: a refused request gets a ticket for 1 s
    later; while it is open, newcomers stop at 8 s of queue (the headroom), so the retry finds
    its room however many newcomers came in between."""
    clock = FakeClock()
    admission, queue = _eleven_seconds_queued(clock)
    assert _admit_keyed(admission, queue, b"a", 100) == pytest.approx(1.0)
    assert len(admission.tickets) == 1

    # Early: a newcomer, refused (11 s queued) with the time left, its ticket kept.
    clock.advance(0.2)
    assert _admit_keyed(admission, queue, b"a", 100) == pytest.approx(0.8)
    # Just before its time, the queue not yet drained: the time left, the place kept.
    clock.advance(0.6)
    assert _admit_keyed(admission, queue, b"a", 100) == pytest.approx(0.2)
    # Its time has come but the model stalled (nothing drained): refused again, promised when
    # the queue will have room, its own work not counted twice.
    clock.advance(0.2)
    assert _admit_keyed(admission, queue, b"a", 100) == pytest.approx(1.0)
    assert len(admission.tickets) == 1
    # The queue drains to 10 s; a newcomer would fit the limit but not the headroom: refused,
    # and promised a time behind the first ticket's work.
    clock.advance(1.0)
    _drain(queue, clock, 100)
    assert admission.expected_wait() == pytest.approx(10.0)
    promised = _admit_keyed(admission, queue, b"b", 100)
    assert promised == pytest.approx(10.0 + 1.0 - 10.0)  # the queue and a's 1 s
    assert admission.retry_after(100) is None  # by the limit alone it would have fitted
    # The first request's retry is admitted at its time, within the whole limit.
    assert _admit_keyed(admission, queue, b"a", 100) == 0.0
    assert len(admission.tickets) == 1 and admission.tickets.claim_rate == 1.0
    # The second's, at its time: the queue has drained by then.
    clock.advance(promised)
    _drain(queue, clock, 100)
    assert _admit_keyed(admission, queue, b"b", 100) == 0.0
    assert len(admission.tickets) == 0
    # No ticket open: newcomers fill the queue to the whole limit again.
    while queue.tokens / 100.0 <= 9.9:
        assert _admit_keyed(admission, queue, b"new", 50) == 0.0


def test_tickets_nobody_claims_expire_and_stop_holding_room() -> None:
    clock = FakeClock()
    admission, queue = _eleven_seconds_queued(clock)
    for client in range(20):  # a flood of clients that never come back
        assert _admit_keyed(admission, queue, b"gone %d" % client, 100) > 0
    tickets = admission.tickets
    assert len(tickets) == 20
    expired = metric("cappy_retry_tickets_total", outcome="expired")
    # Promised in turn: behind the queue and the work promised before it (1 s each).
    assert _admit_keyed(admission, queue, b"probe", 100) == pytest.approx(11.0 + 20 - 10)
    _drain(queue, clock, queue.tokens)
    clock.advance(60.0)
    tickets.sweep(clock())
    assert len(tickets) == 0 and tickets.claim_rate < 0.4
    assert metric("cappy_retry_tickets_total", outcome="expired") == expired + 21
    # The rate now discounts new tickets' work: the next promises come sooner.
    for _ in range(11):
        _admit(admission, queue, pairs=1, length=100)
    for client in range(20):
        _admit_keyed(admission, queue, b"gone again %d" % client, 100)
    assert _admit_keyed(admission, queue, b"probe", 100) < 1.0 + 0.4 * 20


def test_the_same_texts_before_the_tickets_time_are_a_newcomer() -> None:
    """Another client's first try of texts that hold a ticket (or an early retry) is not
    refused for the ticket alone: admitted as a newcomer when the queue has a newcomer's room,
    which claims the ticket."""
    clock = FakeClock()
    admission, queue = _eleven_seconds_queued(clock)
    assert _admit_keyed(admission, queue, b"same", 100) == pytest.approx(1.0)
    clock.advance(0.2)  # before the ticket's time
    _drain(queue, clock, 400)  # 7 s queued: under a newcomer's 8 s
    assert _admit_keyed(admission, queue, b"same", 100) == 0.0
    assert len(admission.tickets) == 0


def test_clients_that_come_back_when_told_find_their_room() -> None:
    """1.5x the model's capacity for a minute, every refused client back exactly when its
    Retry-After said, and back again if refused: the retries promised over the coming seconds
    arrive one by one while the queue drains, and the queue keeps nine in ten promises or more
    (counting every open ticket's work as queued at once keeps only 79% here)."""
    clock = FakeClock()
    admission, queue = _admission(clock, min_pace_tokens=100)
    _known_pace(admission, clock, 100.0)  # 5 requests of 20 tokens a second
    start = clock()
    retries: list[tuple[float, int, bytes]] = []  # a heap of (when, order, key)
    order = itertools.count()
    arrivals, next_new, next_drain = 0, start, start
    kept = broken = 0
    while clock() - start < 60.0:
        clock.advance(max(0.0, min(next_new, next_drain, *(r[0] for r in retries[:1])) - clock()))
        if next_drain <= clock():  # the model takes the oldest pair
            if queue.tokens:
                (item,) = queue.take_batch(clock(), max_tokens=1)
                assert clock() - item.arrival <= 10.0 + 0.2  # the limit, give or take a pair
            next_drain += 0.2
            continue
        retry = bool(retries) and retries[0][0] <= clock()
        if retry:
            key = heapq.heappop(retries)[2]
        else:
            arrivals += 1
            key, next_new = b"client %d" % arrivals, next_new + 1 / 7.5
        told = _admit_keyed(admission, queue, key, 20)
        kept += retry and not told
        broken += retry and bool(told)
        if told:
            heapq.heappush(retries, (clock() + told, next(order), key))
    assert kept + broken > 150
    assert kept / (kept + broken) >= 0.9
