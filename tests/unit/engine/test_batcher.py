"""DynamicBatcher against a fake model that records every batch it receives (tests/unit/engine/
fakes.py): batching, dropping work before the model, failures and lifecycle, overhead. Admission
is in test_admission.py.

Nothing here asserts how long anything took: order comes from events (a held model, a fake clock
that moves only when told), and overhead is counted (lines the queue runs per pair).
"""

from __future__ import annotations

import asyncio
import gc
import math
import random
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from types import FrameType
from typing import Any

import numpy as np
import pytest

from service.engine import queue as queue_module
from service.engine.batcher import DynamicBatcher, ScoredPair, share_of_work
from service.engine.batching_config import (
    CPU_PADDING_TOLERANCE,
    DEVICE_BATCH_LIMITS,
    DEVICE_MAX_WAIT_MS,
    SPLIT_MIN_TOKENS,
    BatcherConfig,
)
from service.engine.errors import DeadlineExceeded, EngineStopped, InferenceFailed
from service.engine.types import ScorerDevice
from tests.unit.engine.fakes import (
    MAX_LENGTH,
    FakeClock,
    FakeScorer,
    PacedScorer,
    batches_in_flight,
    encode,
    eventually,
    expected_score,
    hold_model,
    measure_pace,
    metric,
    pair,
    pending_requests,
    queue_request,
    queued_work,
    running,
)


def padding_fraction(shapes: list[tuple[int, int]], real_tokens: int) -> float:
    padded = sum(rows * width for rows, width in shapes)
    return (padded - real_tokens) / padded


def fifo_shapes(lengths: list[int], budget: int, max_rows: int) -> list[tuple[int, int]]:
    """Batches a plain FIFO queue would form under the same limits."""
    shapes: list[tuple[int, int]] = []
    rows = width = 0
    for length in lengths:
        new_width = max(width, length)
        if rows and (rows + 1 > max_rows or (rows + 1) * new_width > budget):
            shapes.append((rows, width))
            rows, new_width = 0, length
        rows, width = rows + 1, new_width
    shapes.append((rows, width))
    return shapes


# --- batching ------------------------------------------------------------------------------------


async def test_random_workload_respects_budget_and_keeps_order() -> None:
    scorer = FakeScorer()
    budget, max_rows = 400, 8
    rng = random.Random(0)
    requests = [
        [
            pair(rng.choice([rng.randint(5, 60), rng.randint(5, 300)]), rng.randint(2, 9_000))
            for _ in range(rng.randint(1, 30))
        ]
        for _ in range(60)
    ]
    requests.append([pair(600, marker=5), pair(450), pair(6)])  # longer than the budget, truncated

    async def client(pairs: list[tuple[str, str]]) -> list[ScoredPair]:
        await asyncio.sleep(rng.random() * 0.02)
        return await batcher.score(pairs)

    async with running(
        scorer, max_batch_tokens=budget, max_batch_size=max_rows, max_wait_ms=2
    ) as batcher:
        results = await asyncio.gather(*(client(pairs) for pairs in requests))
        assert queued_work(batcher) == (0, 0)

    for pairs, scored in zip(requests, results, strict=True):
        assert [s.score for s in scored] == [expected_score(p) for p in pairs]
        assert [s.tokens for s in scored] == [min(len(p[1].split()) + 4, MAX_LENGTH) for p in pairs]
    assert results[-1][0].truncated and results[-1][0].tokens == MAX_LENGTH
    assert not results[-1][1].truncated
    for rows, width in scorer.shapes:
        assert rows <= max_rows
        assert rows * width <= budget or rows == 1
    assert sum(rows for rows, _ in scorer.shapes) == sum(map(len, requests))


async def test_concurrent_requests_share_batches() -> None:
    """While the model is idle the oldest pair waits up to `max_wait_ms` for company: requests
    that arrive meanwhile share its batch. The fill wait is on the fake clock, so every request
    has arrived before it ends, however slowly the host tokenizes them."""
    clock = FakeClock()
    scorer = FakeScorer()
    async with running(scorer, clock=clock, max_wait_ms=50, padding_tolerance=1.0) as batcher:
        requests = [[pair(10 + i, marker=100 + i), pair(12, marker=200 + i)] for i in range(8)]
        tasks = [asyncio.create_task(batcher.score(p)) for p in requests]
        await eventually(lambda: pending_requests(batcher) == len(requests))
        assert scorer.batches == []  # still filling: 50 ms have not passed on the clock
        clock.advance(0.05)
        results = await asyncio.gather(*tasks)
    assert [[s.score for s in r] for r in results] == [
        [expected_score(p) for p in pairs] for pairs in requests
    ]
    assert len(scorer.batches) < len(requests)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
async def test_the_fill_wait_left_unset_is_the_devices(device: ScorerDevice) -> None:
    """Unset, the fill wait is the device's: none on CPU, where a lone request starts on the
    idle streams at once; on CUDA the oldest pair waits for company until the (fake) clock has
    moved past the device's wait."""
    clock = FakeClock()
    scorer = FakeScorer(device=device)
    wait_s = DEVICE_MAX_WAIT_MS[device] / 1000
    async with running(scorer, clock=clock) as batcher:
        assert batcher.max_wait_ms == DEVICE_MAX_WAIT_MS[device]
        task = asyncio.create_task(batcher.score([pair(10, marker=1)]))
        if wait_s:
            await eventually(lambda: pending_requests(batcher) == 1)
            for _ in range(20):  # the consumer gets its turns; the clock has not moved
                await asyncio.sleep(0)
            assert scorer.batches == []
            clock.advance(wait_s)
        # Bounded only so that a wait that never ends (a defect) fails instead of hanging.
        scored = await asyncio.wait_for(task, timeout=60)
        assert [s.score for s in scored] == [expected_score(pair(10, marker=1))]


async def test_requests_queued_while_model_busy_are_batched_together() -> None:
    scorer = FakeScorer()
    async with running(scorer, max_wait_ms=0) as batcher:
        first = await hold_model(batcher, scorer)
        tasks = [await queue_request(batcher, [pair(8, marker=300 + i)]) for i in range(6)]
        scorer.release()
        await first
        await asyncio.gather(*tasks)
    assert len(scorer.batches) == 2
    assert scorer.shapes[1] == (6, 8)


@pytest.mark.parametrize(
    ("configured", "device", "expected"),
    [
        (None, "cpu", CPU_PADDING_TOLERANCE),
        (None, "cuda", math.inf),
        (0.5, "cpu", 0.5),
        (0.0, "cuda", 0.0),
    ],
)
def test_padding_tolerance_follows_the_device_unless_set(
    configured: float | None, device: ScorerDevice, expected: float
) -> None:
    scorer = FakeScorer(device=device)
    batcher = DynamicBatcher(scorer, encode, BatcherConfig(padding_tolerance=configured))
    assert batcher.padding_tolerance == expected


@pytest.mark.parametrize(
    ("configured", "device", "expected"),
    [
        ({}, "cpu", DEVICE_BATCH_LIMITS["cpu"]),
        ({}, "cuda", DEVICE_BATCH_LIMITS["cuda"]),
        ({"max_batch_tokens": 4096}, "cuda", (4096, DEVICE_BATCH_LIMITS["cuda"][1])),
        ({"max_batch_size": 8}, "cpu", (DEVICE_BATCH_LIMITS["cpu"][0], 8)),
    ],
)
def test_batch_limits_follow_the_device_unless_set(
    configured: dict[str, Any], device: ScorerDevice, expected: tuple[int, int]
) -> None:
    scorer = FakeScorer(device=device)
    batcher = DynamicBatcher(scorer, encode, BatcherConfig(**configured))
    assert (batcher.max_batch_tokens, batcher.max_batch_size) == expected
    assert (batcher.config.max_batch_tokens, batcher.config.max_batch_size) == expected
    assert DEVICE_BATCH_LIMITS["cuda"][0] > DEVICE_BATCH_LIMITS["cpu"][0]


async def test_a_cuda_batch_holds_more_rows_than_a_cpu_one() -> None:
    """Without configured limits, 100 queued pairs make batches of 64 rows on CPU and one of
    100 rows on CUDA."""
    sizes = {}
    devices: tuple[ScorerDevice, ...] = ("cpu", "cuda")
    for device in devices:
        scorer = FakeScorer(device=device)
        async with running(scorer, max_wait_ms=50) as batcher:
            first = await hold_model(batcher, scorer)
            queued = await queue_request(batcher, [pair(10)] * 100)
            scorer.release()
            await asyncio.gather(first, queued)
        sizes[device] = [len(batch) for batch in scorer.batches[1:]]
    assert sizes["cpu"] == [64, 36]
    assert sizes["cuda"] == [100]


class TwoStreamScorer(FakeScorer):
    """A model with two streams: each call waits until a second call is running beside it."""

    parallelism = 2

    def __init__(self) -> None:
        super().__init__()
        self.barrier = threading.Barrier(2, timeout=5)
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            self.barrier.wait()  # BrokenBarrierError unless two batches run at once
            return super().infer(feeds)
        finally:
            with self._lock:
                self.running -= 1


async def test_a_scorer_with_two_streams_runs_two_batches_at_once() -> None:
    scorer = TwoStreamScorer()
    async with running(scorer, max_batch_size=1, max_wait_ms=0) as batcher:
        requests = [[pair(10 + i, marker=100 + i)] for i in range(6)]
        results = await asyncio.gather(*(batcher.score(p) for p in requests))
    assert [r[0].score for r in results] == [expected_score(p[0]) for p in requests]
    assert len(scorer.batches) == 6
    assert scorer.most_running == 2  # never more than its streams


async def test_the_pace_idles_only_when_nothing_is_queued_or_running() -> None:
    """Batches formed behind a held one are no idle spell (their gap is how fast the queue
    drains); the pace pauses only once nothing is queued and nothing runs."""
    scorer = FakeScorer()
    async with running(scorer, max_batch_size=1, max_wait_ms=0) as batcher:
        model_pace = batcher._admission.pace  # noqa: SLF001 - the pace the admission reads
        seen: list[tuple[int, int]] = []
        idle = model_pace.idle

        def recorded() -> None:
            seen.append((queued_work(batcher)[0], batches_in_flight(batcher)))
            idle()

        model_pace.idle = recorded  # type: ignore[method-assign]
        first = await hold_model(batcher, scorer)
        tasks = [await queue_request(batcher, [pair(8, marker=300 + i)]) for i in range(3)]
        scorer.release()
        await asyncio.gather(first, *tasks)
        await eventually(lambda: len(seen) > 0)
    assert len(scorer.batches) == 4
    assert set(seen) == {(0, 0)}


async def test_one_stream_runs_one_batch_at_a_time() -> None:
    scorer = FakeScorer()
    async with running(scorer, max_batch_size=1, max_wait_ms=0) as batcher:
        await hold_model(batcher, scorer)
        tasks = [await queue_request(batcher, [pair(8, marker=300 + i)]) for i in range(3)]
        await eventually(lambda: batches_in_flight(batcher) == 2)  # one padded behind
        assert len(scorer.batches) == 1  # the rest wait for the model
        assert queued_work(batcher)[0] == 2  # and no third batch is formed
        scorer.release()
        await asyncio.gather(*tasks)
    assert len(scorer.batches) == 4


# --- splitting work across idle streams ---------------------------------------------------------


class StreamsScorer(FakeScorer):
    """The fake model with `streams` streams: that many batches may wait at its gate at once."""

    def __init__(self, streams: int, device: ScorerDevice = "cpu") -> None:
        super().__init__(device=device)
        self.parallelism = streams


async def score_held(
    scorer: StreamsScorer, pairs: list[tuple[str, str]], *, in_flight: int
) -> None:
    """Scores `pairs` as one request with the model held at its gate until `in_flight` batches
    wait there together and nothing is left queued; checks the answers, in the caller's order."""
    async with running(scorer, max_wait_ms=0) as batcher:
        scorer.hold()
        task = asyncio.create_task(batcher.score(pairs))
        await eventually(lambda: len(scorer.batches) == in_flight)
        assert batches_in_flight(batcher) == in_flight and queued_work(batcher) == (0, 0)
        scorer.release()
        scored = await task
    assert [s.score for s in scored] == [expected_score(p) for p in pairs]


async def test_a_lone_request_runs_on_both_idle_streams_at_once() -> None:
    """10 pairs of 40 tokens on two idle streams: two batches of 5 rows, both at the model
    together (held at its gate), answered in the caller's order."""
    scorer, pairs = StreamsScorer(2), [pair(40, marker=100 + i) for i in range(10)]
    await score_held(scorer, pairs, in_flight=2)
    assert scorer.shapes == [(5, 40), (5, 40)]
    assert sorted(int(row[-2]) for batch in scorer.batches for row in batch) == list(
        range(100, 110)
    )


async def test_parts_are_of_similar_size_on_more_streams() -> None:
    """Three idle streams, 12 pairs of 40 tokens: a share of 160 tokens each, 4 rows."""
    scorer, pairs = StreamsScorer(3), [pair(40, marker=100 + i) for i in range(12)]
    await score_held(scorer, pairs, in_flight=3)
    assert scorer.shapes == [(4, 40)] * 3


@pytest.mark.parametrize(
    ("queued", "running", "streams", "share"),
    [
        (400, 0, 2, 200),  # a lone request on two idle streams: half each
        (400, 200, 2, 300),  # one stream busy with 200 left: the free one takes 300
        (100, 300, 2, None),  # the share (200) holds everything queued: formed as ever
        (400, 0, 3, 134),  # three streams, rounded up
        (120, 0, 2, None),  # under two parts of SPLIT_MIN_TOKENS: one batch
        (128, 0, 2, 64),  # two parts of SPLIT_MIN_TOKENS
        (16_000, 0, 2, 8000),  # under a full batch (8,192) for each stream
        (16_000, 384, 2, None),  # a full batch at hand for each stream: formed as ever
        (400, 0, 1, None),  # one stream: nothing to share with
    ],
)
def test_the_share_of_work(queued: int, running: float, streams: int, share: int | None) -> None:
    assert SPLIT_MIN_TOKENS == 64  # the cases are cut around it
    assert share_of_work(queued, running, streams, 8192) == share


async def test_a_stream_that_comes_free_takes_its_share_of_what_is_left() -> None:
    """One stream runs a pair of 200 tokens (the pace unknown: all of it counts as left) when 20
    pairs of 20 tokens come: the free stream takes its share of the 600 tokens at hand, 300 (15
    rows), not all 20 rows; the 5 left wait for the first stream to come free."""
    scorer = StreamsScorer(2)
    async with running(scorer, max_wait_ms=0) as batcher:
        scorer.hold()
        first = asyncio.create_task(batcher.score([pair(200, marker=7)]))
        await eventually(lambda: len(scorer.batches) == 1)
        later = await queue_request(batcher, [pair(20, marker=100 + i) for i in range(20)])
        await eventually(lambda: len(scorer.batches) == 2)
        assert scorer.shapes == [(1, 200), (15, 24)] and queued_work(batcher) == (5, 100)
        scorer.release()
        await asyncio.gather(first, later)
    assert scorer.shapes[2:] == [(5, 24)]


async def test_a_running_batch_counts_what_it_has_left_at_the_pace() -> None:
    """With the pace known, a running batch counts its tokens less what one stream (half the
    pace) has run of them since it started: on a fake clock, 200 tokens that have run for 200
    tokens' time at the whole model's pace have half left, so the free stream's share of 20
    pairs of 20 tokens is (400 + 100) / 2 = 250 tokens (12 rows), not 300 (15 rows)."""
    clock = FakeClock()
    scorer = PacedScorer(clock, seconds_per_token=0.001)
    scorer.parallelism = 2
    async with running(scorer, clock=clock, max_wait_ms=0) as batcher:
        rate = await measure_pace(batcher)
        scorer.hold()
        seen = len(scorer.shapes)
        first = asyncio.create_task(batcher.score([pair(200, marker=7)]))
        await eventually(lambda: len(scorer.shapes) == seen + 1)  # its 200 tokens' time passed
        later = await queue_request(batcher, [pair(20, marker=100 + i) for i in range(20)])
        await eventually(lambda: len(scorer.shapes) == seen + 2)
        left = 200 - 200 * 0.001 * rate / 2
        assert scorer.shapes[seen:] == [(1, 200), (math.ceil((400 + left) / 2) // 20, 24)]
        scorer.release()
        await asyncio.gather(first, later)
    assert rate == pytest.approx(1000, rel=0.05)


class AloneScorer(StreamsScorer):
    """Two streams, and a way to score a batch alone on every core that records its batches
    (in `alone_shapes`) and can be held at a gate of its own."""

    def __init__(self) -> None:
        super().__init__(2)
        self.alone_shapes: list[tuple[int, int]] = []
        self.alone_gate = threading.Event()
        self.alone_gate.set()

    def alone(self) -> Any:
        return self._alone

    def _alone(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        self.alone_shapes.append(ids.shape)
        assert self.alone_gate.wait(10), "the test never released the lone batch"
        return (ids * mask).sum(axis=1).astype(np.float32)


async def test_a_lone_batch_that_cannot_be_split_runs_alone_on_every_core() -> None:
    """A one-pair request, and one of 4 pairs under two parts' `SPLIT_MIN_TOKENS`, are one batch
    each with nothing beside or behind it: the scorer's lone-batch path runs them. A request
    that splits runs on the streams as ever."""
    scorer = AloneScorer()
    async with running(scorer, max_wait_ms=0) as batcher:
        one, small = [pair(300, marker=7)], [pair(20, marker=8 + i) for i in range(4)]
        split = [pair(40, marker=100 + i) for i in range(10)]
        for pairs in (one, small, split):
            scored = await batcher.score(pairs)
            assert [s.score for s in scored] == [expected_score(p) for p in pairs]
    assert scorer.alone_shapes == [(1, 304), (4, 24)]
    assert sorted(scorer.shapes) == [(5, 40), (5, 40)]


async def test_nothing_reaches_the_model_beside_a_lone_batch() -> None:
    """While a lone batch runs on every core, a request that comes meanwhile (even a full
    batch of it) waits: it would take a core from it. It runs when the lone batch is done."""
    scorer = AloneScorer()
    async with running(scorer, max_wait_ms=0, max_batch_size=4) as batcher:
        scorer.alone_gate.clear()
        first = asyncio.create_task(batcher.score([pair(30, marker=7)]))
        await eventually(lambda: len(scorer.alone_shapes) == 1)
        later = await queue_request(batcher, [pair(30, marker=10 + i) for i in range(8)])
        await asyncio.sleep(0.05)  # time for a wrong batch to reach the model, if one would
        assert scorer.shapes == [] and queued_work(batcher)[0] == 8
        scorer.alone_gate.set()
        await asyncio.gather(first, later)
    assert scorer.alone_shapes == [(1, 32)] and sorted(scorer.shapes) == [(4, 32), (4, 32)]


@pytest.mark.parametrize(
    ("lengths", "shapes"),
    [
        ((300,), [(1, 304)]),  # one pair: nothing to split
        ((20, 20), [(2, 24)]),  # 40 tokens: under SPLIT_MIN_TOKENS a part
        ((30, 30, 30, 30), [(4, 32)]),  # 120 tokens: still under it for two parts
        ((64, 64), [(1, 64), (1, 64)]),  # 128 tokens: two parts of 64
    ],
)
async def test_a_small_request_is_not_split_below_the_minimum_part(
    lengths: tuple[int, ...], shapes: list[tuple[int, int]]
) -> None:
    assert SPLIT_MIN_TOKENS == 64  # the cases are cut around it
    scorer = StreamsScorer(2)
    pairs = [pair(n, marker=100 + i) for i, n in enumerate(lengths)]
    async with running(scorer, max_wait_ms=0) as batcher:
        scored = await batcher.score(pairs)
    assert [s.score for s in scored] == [expected_score(p) for p in pairs]
    assert sorted(scorer.shapes) == shapes


@pytest.mark.parametrize(
    ("streams", "device", "split"),
    [(1, "cpu", None), (2, "cpu", False), (2, "cuda", None)],
)
async def test_no_split_with_one_stream_when_off_or_on_cuda(
    streams: int, device: ScorerDevice, split: bool | None
) -> None:
    """One stream, `split_across_streams=False`, or CUDA's default: one batch, as before."""
    scorer = StreamsScorer(streams, device=device)
    pairs = [pair(40, marker=100 + i) for i in range(10)]
    async with running(scorer, max_wait_ms=0, split_across_streams=split) as batcher:
        scored = await batcher.score(pairs)
    assert [s.score for s in scored] == [expected_score(p) for p in pairs]
    assert scorer.shapes == [(10, 40)]


@pytest.mark.parametrize("split", [True, False])
async def test_a_queue_holding_a_full_batch_per_stream_is_batched_as_before(split: bool) -> None:
    """12 pairs of 16 tokens and 2 of 200 reach two idle streams: 592 tokens, a full batch (256)
    for each stream. The batches are those formed without the split: the 12 short pairs
    together, each long one alone (two of 200 exceed the budget), where cutting the queue in
    two would have made 7 + 5 rows of the short ones."""
    scorer = StreamsScorer(2)
    pairs = [pair(16, marker=100 + i) for i in range(12)]
    pairs += [pair(200, marker=200), pair(200, marker=201)]
    async with running(
        scorer, max_wait_ms=0, max_batch_tokens=256, max_batch_size=16, split_across_streams=split
    ) as batcher:
        scored = await batcher.score(pairs)
    assert [s.score for s in scored] == [expected_score(p) for p in pairs]
    assert sorted(scorer.shapes) == [(1, 200), (1, 200), (12, 16)]


async def test_batch_widths_are_padded_to_the_multiple_never_past_the_max_length() -> None:
    scorer = FakeScorer()
    config = BatcherConfig(max_batch_size=1, max_wait_ms=0, pad_to_multiple=8)
    batcher = DynamicBatcher(scorer, encode, config, max_length=20)
    await batcher.start()
    try:
        pairs = [pair(5, marker=2), pair(9, marker=3), pair(17, marker=4), pair(20, marker=5)]
        scored = await batcher.score(pairs)
    finally:
        await batcher.stop()
    assert [s.score for s in scored] == [expected_score(p) for p in pairs]  # pads change nothing
    assert [s.tokens for s in scored] == [5, 9, 17, 20]
    assert sorted(width for _, width in scorer.shapes) == [8, 16, 20, 20]


@pytest.mark.parametrize(
    ("multiple", "shapes"), [(8, [(8, 16)]), (1, [(1, n) for n in range(9, 17)])]
)
async def test_pairs_of_one_padding_step_share_a_batch_for_free(
    multiple: int, shapes: list[tuple[int, int]]
) -> None:
    """At zero padding tolerance, lengths 9..16 are one batch padded to 16 with steps of 8,
    and eight batches (one per length) without steps."""
    scorer = FakeScorer()
    async with running(
        scorer, max_wait_ms=0, padding_tolerance=0.0, pad_to_multiple=multiple
    ) as batcher:
        first = await hold_model(batcher, scorer)
        task = await queue_request(batcher, [pair(n, marker=300 + n) for n in range(9, 17)])
        scorer.release()
        await first
        scored = await task
    assert [s.tokens for s in scored] == list(range(9, 17))
    assert sorted(scorer.shapes[1:]) == shapes


async def test_the_token_budget_counts_the_padded_width() -> None:
    scorer = FakeScorer()
    async with running(
        scorer, max_wait_ms=0, max_batch_tokens=32, padding_tolerance=1.0, pad_to_multiple=8
    ) as batcher:
        first = await hold_model(batcher, scorer)
        task = await queue_request(batcher, [pair(9, marker=400 + i) for i in range(4)])
        scorer.release()
        await first
        await task
    assert scorer.shapes[1:] == [(2, 16), (2, 16)]  # 9 tokens each, 16 wide: two rows fit in 32


def test_pad_to_multiple_must_be_positive() -> None:
    with pytest.raises(ValueError, match="pad_to_multiple"):
        BatcherConfig(pad_to_multiple=0)


async def test_huge_request_is_split_and_answered_in_order() -> None:
    scorer = FakeScorer()
    rng = random.Random(1)
    pairs = [pair(rng.randint(5, 120), marker=i + 2) for i in range(2000)]
    async with running(scorer, max_batch_tokens=2048, max_batch_size=32) as batcher:
        scored = await batcher.score(pairs)
    assert [s.score for s in scored] == [expected_score(p) for p in pairs]
    assert len(scorer.batches) >= 2000 / 32
    assert all(rows <= 32 and rows * width <= 2048 for rows, width in scorer.shapes)


@pytest.mark.parametrize("tolerance", [1.0, math.inf])
async def test_length_grouping_cuts_padding_against_fifo(tolerance: float) -> None:
    scorer = FakeScorer()
    rng = random.Random(2)
    budget, max_rows = 1024, 16
    requests = [[pair(rng.choice([6, 12, 40, 90, 200])) for _ in range(8)] for _ in range(30)]
    async with running(
        scorer, max_batch_tokens=budget, max_batch_size=max_rows, padding_tolerance=tolerance
    ) as batcher:
        first = await hold_model(batcher, scorer)
        tasks = [await queue_request(batcher, pairs) for pairs in requests]
        scorer.release()
        await asyncio.gather(first, *tasks)

    lengths = [len(p[1].split()) + 4 for pairs in requests for p in pairs]
    shapes = scorer.shapes[1:]  # the holding batch aside
    assert all(rows <= max_rows and rows * width <= budget for rows, width in shapes)
    grouped = padding_fraction(shapes, sum(lengths))
    fifo = padding_fraction(fifo_shapes(lengths, budget, max_rows), sum(lengths))
    assert fifo > 0.4
    assert grouped < fifo / 3, (grouped, fifo)


async def test_oldest_pair_is_not_starved_by_shorter_ones() -> None:
    scorer = FakeScorer()
    async with running(scorer, max_batch_tokens=2048, max_batch_size=16) as batcher:
        first = await hold_model(batcher, scorer)
        long_one = await queue_request(batcher, [pair(300, marker=4242)])
        short = [await queue_request(batcher, [pair(6)] * 16) for _ in range(5)]
        scorer.release()
        await asyncio.gather(first, long_one, *short)
    assert any((row == 4242).any() for row in scorer.batches[1])


# --- dropping work before the model --------------------------------------------------------------


async def test_cancelled_request_never_reaches_the_model() -> None:
    scorer = FakeScorer()
    dropped = metric("cappy_pairs_dropped_total", reason="cancelled")
    async with running(scorer) as batcher:
        first = await hold_model(batcher, scorer)
        doomed = await queue_request(batcher, [pair(9, marker=999), pair(30, marker=999)])
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert queued_work(batcher) == (0, 0)
        scorer.release()
        await first
        assert [s.score for s in await batcher.score([pair(9, marker=8)])] == [
            expected_score(pair(9, marker=8))
        ]
    assert not scorer.saw(999)
    assert metric("cappy_pairs_dropped_total", reason="cancelled") == dropped + 2


async def test_expired_deadline_raises_and_never_reaches_the_model() -> None:
    scorer = FakeScorer()
    async with running(scorer) as batcher:
        first = await hold_model(batcher, scorer)
        with pytest.raises(DeadlineExceeded):
            await batcher.score([pair(9, marker=998)], deadline=time.monotonic() + 0.05)
        # Raised at its deadline, not when the model came free: the model is still held.
        assert len(scorer.batches) == 1 and not scorer.gate.is_set()
        assert queued_work(batcher)[0] == 0
        scorer.release()
        await first
        await batcher.score([pair(9)])
        with pytest.raises(DeadlineExceeded):
            await batcher.score([pair(9, marker=998)], deadline=time.monotonic() - 1)
    assert not scorer.saw(998)


async def test_default_timeout_applies_without_a_deadline() -> None:
    """The deadlines are on a fake clock that never reaches them: only each request's own
    timer (the default 50 ms) ends it, never the consumer, which would drop the holding pair
    before the model if a busy host kept it from the queue for 50 ms."""
    clock = FakeClock()
    scorer = FakeScorer()
    async with running(scorer, clock=clock, max_wait_ms=0, default_timeout_s=0.05) as batcher:
        first = await hold_model(batcher, scorer)
        with pytest.raises(DeadlineExceeded):
            await batcher.score([pair(9, marker=997)])
        scorer.release()
        with pytest.raises(DeadlineExceeded):
            await first  # the holding request had the same default deadline
    assert not scorer.saw(997)


async def test_consumer_drops_items_whose_deadline_passed_while_queued() -> None:
    """The consumer checks deadlines too, for when the caller's timer has not fired yet."""
    scorer = FakeScorer()
    async with running(scorer) as batcher:
        first = await hold_model(batcher, scorer)
        late = await queue_request(batcher, [pair(9, marker=996)], deadline=time.monotonic() + 5)
        ok = await queue_request(batcher, [pair(9)])
        queued = batcher._queue.oldest(time.monotonic())  # late's pair, behind the held one
        assert queued is not None
        queued.request.deadline = time.monotonic() - 1  # passes without the loop seeing a timer
        scorer.release()
        await first
        with pytest.raises(DeadlineExceeded):
            await late
        await ok
    assert not scorer.saw(996)


# --- failures and lifecycle ----------------------------------------------------------------------


async def test_model_exception_fails_only_that_request() -> None:
    scorer = FakeScorer(fail_on=666)
    async with running(scorer, max_batch_size=1) as batcher:
        bad, good = await asyncio.gather(
            batcher.score([pair(9, marker=666)]),
            batcher.score([pair(9), pair(11)]),
            return_exceptions=True,
        )
        assert isinstance(bad, InferenceFailed)
        assert "secret" not in str(bad)
        assert isinstance(bad.__cause__, RuntimeError)
        assert isinstance(good, list) and len(good) == 2
        assert batcher.alive
        assert len(await batcher.score([pair(12)])) == 1


async def test_stop_drains_accepted_work_then_refuses_new_work() -> None:
    scorer = FakeScorer()
    batcher = DynamicBatcher(scorer, encode, BatcherConfig())
    await batcher.start()
    first = await hold_model(batcher, scorer)
    queued = [await queue_request(batcher, [pair(6 + i)] * 3) for i in range(3)]
    stopping = asyncio.create_task(batcher.stop(drain=True))
    await eventually(lambda: not batcher.accepting)
    with pytest.raises(EngineStopped):
        await batcher.score([pair(6)])
    scorer.release()
    await stopping
    assert [len(r) for r in await asyncio.gather(first, *queued)] == [1, 3, 3, 3]
    assert not batcher.alive
    with pytest.raises(EngineStopped):
        await batcher.score([pair(6)])


async def test_stop_without_drain_fails_queued_work() -> None:
    scorer = FakeScorer()
    batcher = DynamicBatcher(scorer, encode, BatcherConfig())
    await batcher.start()
    first = await hold_model(batcher, scorer)
    queued = await queue_request(batcher, [pair(6, marker=995)])
    stopping = asyncio.create_task(batcher.stop(drain=False))
    with pytest.raises(EngineStopped):
        await queued
    with pytest.raises(EngineStopped):
        await first
    scorer.release()  # the running batch finishes before stop() returns
    await stopping
    assert not scorer.saw(995)
    assert not batcher.alive


async def test_nothing_runs_before_start() -> None:
    scorer = FakeScorer()
    batcher = DynamicBatcher(scorer, encode, BatcherConfig())
    assert not batcher.alive and not batcher.accepting
    with pytest.raises(EngineStopped):
        await batcher.score([pair(6)])
    await batcher.stop()  # harmless
    await batcher.start()
    try:
        assert await batcher.score([]) == []
        assert len(await batcher.score([pair(6)])) == 1
    finally:
        await batcher.stop()


async def test_dead_consumer_fails_pending_and_new_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scorer = FakeScorer()
    async with running(scorer, max_wait_ms=20) as batcher:

        def broken(_now: float) -> None:
            raise RuntimeError("consumer bug")

        monkeypatch.setattr(batcher._queue, "take_batch", broken)
        with pytest.raises(EngineStopped):
            await batcher.score([pair(6)])
        assert not batcher.alive
        with pytest.raises(EngineStopped):
            await batcher.score([pair(6)])
    assert scorer.batches == []


# --- overhead ------------------------------------------------------------------------------------


class QueueLines:
    """Counts the lines of service/engine/queue.py run on this thread while active: the queue's
    work, whatever the host's speed. (Replaces any other tracer, e.g. coverage, meanwhile.)"""

    def __init__(self) -> None:
        self.lines = 0
        self._old: Any = None

    def __enter__(self) -> QueueLines:
        self._old = sys.gettrace()
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc_info: object) -> None:
        sys.settrace(self._old)

    def _call(self, frame: FrameType, _event: str, _arg: object) -> Any:
        return self._line if frame.f_code.co_filename == queue_module.__file__ else None

    def _line(self, _frame: FrameType, event: str, _arg: object) -> Any:
        if event == "line":
            self.lines += 1
        return self._line


async def _queue_work(requests: int) -> tuple[float, int]:
    """Queues `requests` requests of 64 pairs (5 to 200 tokens) behind a held model, then
    drains them; returns the lines of queue code run per pair meanwhile, and the batches."""
    scorer = FakeScorer()
    rng = random.Random(3)
    pairs = [[pair(rng.randint(5, 200)) for _ in range(64)] for _ in range(requests)]
    async with running(scorer, max_queue_tokens=10**7) as batcher:
        first = await hold_model(batcher, scorer)
        tasks = [asyncio.create_task(batcher.score(p)) for p in pairs]
        await eventually(lambda: pending_requests(batcher) == 1 + requests)
        with QueueLines() as counted:
            scorer.release()
            results = await asyncio.gather(first, *tasks)
    for scored, sent in zip(results[1:], pairs, strict=True):
        assert [s.score for s in scored] == [expected_score(p) for p in sent]
    return counted.lines / (requests * 64), len(scorer.batches)


async def test_queue_overhead_stays_small_with_thousands_queued() -> None:
    """Forming batches from a deep queue must cost the same per pair as from a shallow one
    (O(rows + buckets) a batch), not O(queue) each. Counted in lines of queue code run, a
    ratio of two queues of the same run: 320 and 5,120 pairs deep."""
    shallow, _ = await _queue_work(5)
    deep, batches = await _queue_work(80)
    # ~1.0; a two-line scan of the queue per batch made it 1.7.
    assert deep < 1.5 * shallow, (deep, shallow)
    # Full batches across requests (a request's 64 pairs spread over ~25 length buckets):
    # ~100 for 5,120 pairs.
    assert batches <= 80 * 64 / 32


async def test_per_request_mode_never_mixes_requests() -> None:
    """cross_request=False, the benchmarks' baseline: every batch holds one request's pairs."""
    scorer = FakeScorer()
    async with running(scorer, max_batch_size=8, max_wait_ms=20, cross_request=False) as batcher:
        blocker = await hold_model(batcher, scorer)
        # Marker r + 10 tags request r's rows; 11 pairs each need two batches of at most 8.
        requests = [[pair(5 + (i * 7) % 30, marker=r + 10) for i in range(11)] for r in range(4)]
        tasks = [await queue_request(batcher, pairs) for pairs in requests]
        scorer.release()
        results = await asyncio.gather(*tasks)
        await blocker
    for pairs, result in zip(requests, results, strict=True):
        assert [r.score for r in result] == [expected_score(p) for p in pairs]
    for batch in scorer.batches[1:]:
        markers = {int(row[-2]) for row in batch}
        assert len(markers) == 1, markers
    assert len(scorer.batches) - 1 == 4 * 2


async def test_queue_gauges_sum_every_running_batcher() -> None:
    """Two batchers (two scoring stages) queue at once: the gauges show both queues, and drop a
    stopped batcher's share."""
    first_scorer, second_scorer = FakeScorer(), FakeScorer()
    async with running(first_scorer) as first, running(second_scorer) as second:
        held = [await hold_model(first, first_scorer), await hold_model(second, second_scorer)]
        waiting = [
            await queue_request(first, [pair(10)] * 3),
            await queue_request(second, [pair(20)] * 2),
        ]
        assert (queued_work(first)[0], queued_work(second)[0]) == (3, 2)
        assert metric("cappy_queue_pairs") == 5
        assert metric("cappy_queue_tokens") == 3 * 10 + 2 * 20
        second_scorer.release()
        await asyncio.gather(held[1], waiting[1])
        await eventually(lambda: metric("cappy_queue_pairs") == 3)
        first_scorer.release()
        await asyncio.gather(held[0], waiting[0])
    assert metric("cappy_queue_pairs") == 0


async def test_expected_wait_gauge_is_the_longest_wait_of_the_running_batchers() -> None:
    """cappy_queue_expected_wait_seconds, read at scrape time: 0 while nothing is queued or no
    pace is known yet, else the longest `expected_wait()` of the running batchers, at the pace
    of their last batches (fixed while the models are held)."""
    name = "cappy_queue_expected_wait_seconds"
    clocks = FakeClock(), FakeClock()
    first_scorer = PacedScorer(clocks[0], seconds_per_token=0.001)
    second_scorer = PacedScorer(clocks[1], seconds_per_token=0.002)
    async with (
        running(first_scorer, clock=clocks[0], max_wait_ms=0) as first,
        running(second_scorer, clock=clocks[1], max_wait_ms=0) as second,
    ):
        assert metric(name) == 0
        held = await hold_model(first, first_scorer)
        queued = await queue_request(first, [pair(10)] * 3)
        assert queued_work(first)[1] == 30 and first.expected_wait() is None
        assert metric(name) == 0  # queued, but no pace known to wait by
        first_scorer.release()
        await asyncio.gather(held, queued)
        pace = await measure_pace(first)
        await measure_pace(second)
        assert metric(name) == 0  # a pace, nothing queued

        held_both = [await hold_model(first, first_scorer), await hold_model(second, second_scorer)]
        waiting = [
            await queue_request(first, [pair(10)] * 3),
            await queue_request(second, [pair(20)] * 5),
        ]
        waits = [first.expected_wait(), second.expected_wait()]
        assert waits == [pytest.approx(30 / pace), pytest.approx(100 / (pace / 2))]
        assert metric(name) == max(w for w in waits if w is not None)
        second_scorer.release()
        await asyncio.gather(held_both[1], waiting[1])
        assert metric(name) == first.expected_wait()  # second's queue is empty again
        first_scorer.release()
        await asyncio.gather(held_both[0], waiting[0])
    assert metric(name) == 0


async def test_expected_wait_gauge_keeps_no_stopped_batcher_alive() -> None:
    """The gauge reads the running batchers at scrape time; it holds none, so a reload's old
    batchers are freed and a restarted one is counted again."""
    clock = FakeClock()
    scorer = PacedScorer(clock, seconds_per_token=0.001)
    batcher = DynamicBatcher(scorer, encode, BatcherConfig(max_wait_ms=0), clock=clock)
    for _ in range(2):  # stop, then start again: still counted
        await batcher.start()
        await measure_pace(batcher)
        first = await hold_model(batcher, scorer)
        queued = await queue_request(batcher, [pair(10)] * 2)
        wait = batcher.expected_wait()
        assert wait is not None and wait > 0
        assert metric("cappy_queue_expected_wait_seconds") == wait
        scorer.release()
        await asyncio.gather(first, queued)
        await batcher.stop()
        assert metric("cappy_queue_expected_wait_seconds") == 0
    gone = weakref.ref(batcher)
    del batcher, first, queued
    gc.collect()
    assert gone() is None


# --- other model work on the workers ------------------------------------------------------------


async def test_other_model_work_takes_a_worker_turn_behind_running_batches() -> None:
    """run_on_workers (the exact re-scoring) queues on the model's worker threads: with one
    stream busy it waits for the batch instead of running beside it."""
    scorer = FakeScorer()
    ran: list[str] = []

    def job() -> str:
        ran.append(threading.current_thread().name)
        return "done"

    async with running(scorer, max_batch_size=1, max_wait_ms=0) as batcher:
        held = await hold_model(batcher, scorer)
        work = asyncio.create_task(batcher.run_on_workers(job))
        await asyncio.sleep(0.05)  # room to run too early; no bound: held, it cannot have run
        assert ran == []  # the only worker is running the held batch
        scorer.release()
        assert await work == "done"
        await held
    assert ran[0].startswith("cappy-model")


async def test_other_model_work_runs_in_a_thread_when_the_batcher_is_stopped() -> None:
    batcher = DynamicBatcher(FakeScorer(), encode, BatcherConfig())
    assert await batcher.run_on_workers(lambda x: x + 1, 1) == 2  # before start
    await batcher.start()
    await batcher.stop()
    thread = await batcher.run_on_workers(lambda: threading.current_thread().name)
    assert not thread.startswith("cappy-model")  # after stop: a plain thread


async def test_other_model_work_raises_its_own_errors() -> None:
    def broken() -> None:
        raise ValueError("bad feeds")

    async with running(FakeScorer()) as batcher:
        with pytest.raises(ValueError, match="bad feeds"):
            await batcher.run_on_workers(broken)
