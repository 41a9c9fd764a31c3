"""The pair queue and batch forming, synchronously (no event loop, no model): the oldest pair
seeds a batch, similar lengths join within the budget, rows and padding tolerance, expired
requests are handed to `expire`, abandoned ones go stale and are swept."""

from __future__ import annotations

import math

import numpy as np

from service.engine.queue import PairQueue, QueuedRequest
from service.engine.types import EncodedPair


def request(*lengths: int, deadline: float | None = None) -> QueuedRequest:
    encoded = [EncodedPair(np.ones(n, dtype=np.int64), None, False) for n in lengths]
    return QueuedRequest(encoded, sum(lengths), deadline)


def make_queue(**overrides: object) -> tuple[PairQueue, list[QueuedRequest]]:
    expired: list[QueuedRequest] = []

    def expire(req: QueuedRequest) -> None:
        req.done = True
        expired.append(req)

    options: dict = {
        "max_batch_tokens": 256,
        "max_batch_size": 8,
        "padding_tolerance": math.inf,
        "pad_to_multiple": 8,
        "max_length": 512,
        "cross_request": True,
        "expire": expire,
        **overrides,
    }
    return PairQueue(**options), expired


def lengths(batch: list) -> list[int]:
    return sorted(item.length for item in batch)


def test_the_oldest_seeds_and_similar_lengths_join_within_the_budget() -> None:
    queue, _ = make_queue()
    queue.add(request(40), now=0.0)  # the oldest
    queue.add(request(100, 41, 39, 12), now=1.0)
    queue.add(request(44, 47), now=2.0)
    assert (queue.pairs, queue.tokens) == (7, 323)
    batch = queue.take_batch(now=3.0)
    assert batch is not None and batch[0].length == 40
    # Width 48 (40 rounded up to 8s): 5 rows fit 256 tokens; the nearest lengths join first,
    # and 47 shares the seed's step for free, before 12 (which would pad 36 tokens).
    assert lengths(batch) == [39, 40, 41, 44, 47]
    assert all(queue.width(item.length) <= 48 for item in batch)
    assert (queue.pairs, queue.tokens) == (2, 112)
    assert lengths(queue.take_batch(now=3.0) or []) == [12, 100]
    assert queue.take_batch(now=3.0) is None and queue.pairs == 0


def test_rows_and_padding_tolerance_limit_a_batch() -> None:
    queue, _ = make_queue(max_batch_size=2)
    queue.add(request(8, 8, 8), now=0.0)
    assert [len(queue.take_batch(now=0.0) or []) for _ in range(2)] == [2, 1]

    queue, _ = make_queue(padding_tolerance=0.5)
    queue.add(request(64), now=0.0)
    queue.add(request(16, 56), now=1.0)
    # 16 would add 48 padding tokens (3 per token of its own); 56 adds 8 (of 56): it joins.
    assert lengths(queue.take_batch(now=1.0) or []) == [56, 64]
    assert lengths(queue.take_batch(now=1.0) or []) == [16]


def test_only_pairs_within_the_window_of_the_seed_join_its_batch() -> None:
    """Newer pairs of the seed's length would otherwise overtake an older pair of another
    length, which then waits longer than the tokens ahead of it take."""
    queue, _ = make_queue(window=1.0)
    queue.add(request(40), now=0.0)  # the seed
    queue.add(request(200), now=0.5)  # an older pair of another length
    queue.add(request(41, 39), now=0.9)
    queue.add(request(40, 42), now=1.5)  # newer than the window allows
    assert lengths(queue.take_batch(now=2.0) or []) == [39, 40, 41]
    assert lengths(queue.take_batch(now=2.0) or []) == [200]  # its turn before the newer 40s
    assert lengths(queue.take_batch(now=2.0) or []) == [40, 42]

    queue, _ = make_queue()  # no window: the newer pairs join the seed, the 200 waits
    queue.add(request(40), now=0.0)
    queue.add(request(200), now=0.5)
    queue.add(request(41, 39), now=0.9)
    queue.add(request(40, 42), now=1.5)
    assert lengths(queue.take_batch(now=2.0) or []) == [39, 40, 40, 41, 42]


def test_each_pair_knows_the_tokens_queued_ahead_of_it() -> None:
    """The queue before its request and its request's other pairs, which arrive with it and
    are served in no order among themselves."""
    queue, _ = make_queue()
    queue.add(request(10, 20), now=0.0)
    queue.add(request(5), now=1.0)
    assert list(queue.arrivals()) == [(0.0, 10), (0.0, 20), (1.0, 5)]  # oldest first
    ahead = sorted((item.length, item.ahead) for item in queue.take_batch(now=1.0) or [])
    assert ahead == [(5, 30), (10, 20), (20, 10)]
    assert list(queue.arrivals()) == []


def test_expired_requests_are_handed_to_expire_and_skipped() -> None:
    queue, expired = make_queue()
    late = request(10, 10, deadline=5.0)
    queue.add(late, now=0.0)
    queue.add(request(12), now=1.0)
    batch = queue.take_batch(now=6.0)
    assert expired == [late] and lengths(batch or []) == [12]
    assert queue.oldest(now=6.0) is None


def test_forgotten_requests_go_stale_and_are_swept() -> None:
    queue, _ = make_queue()
    gone = request(*([9] * 5000))
    queue.add(gone, now=0.0)
    kept = request(30)
    queue.add(kept, now=1.0)
    gone.done = True
    assert queue.forget(gone) == 5000 and (queue.pairs, queue.tokens) == (1, 30)
    assert queue.forget(gone) == 0  # counted once
    assert lengths(queue.take_batch(now=2.0) or []) == [30]
    assert queue.pairs == 0
    queue.clear()
    assert not queue.has_stale()


def test_per_request_batching_takes_one_requests_pairs_shortest_first() -> None:
    queue, _ = make_queue(cross_request=False)
    queue.add(request(50, 10, 30), now=0.0)
    queue.add(request(11), now=1.0)
    assert lengths(queue.take_batch(now=2.0) or []) == [10, 30, 50]
    assert lengths(queue.take_batch(now=2.0) or []) == [11]


def test_max_tokens_caps_one_batch_and_the_seed_always_joins() -> None:
    """A share of work shared across streams: `max_tokens` real tokens cap that batch alone, in
    both modes; the seed joins even when it alone is over the cap, and a cap above the budget
    or `max_batch_size` changes nothing."""
    for cross_request in (True, False):
        queue, _ = make_queue(cross_request=cross_request)
        queue.add(request(*([16] * 12)), now=0.0)
        assert len(queue.take_batch(now=0.0, max_tokens=48) or []) == 3
        assert len(queue.take_batch(now=0.0, max_tokens=47) or []) == 2
        assert len(queue.take_batch(now=0.0, max_tokens=10) or []) == 1
        assert len(queue.take_batch(now=0.0, max_tokens=10_000) or []) == 6
        assert queue.pairs == 0
