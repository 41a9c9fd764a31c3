"""The queue of tokenized pairs and the forming of batches: plain and synchronous (the async
batcher in batcher.py owns admission, workers and completion).

Every queued pair is kept twice: in arrival order (finds the oldest, so nothing starves) and in
length buckets of 8 tokens, each in arrival order (finds similar lengths). A batch is seeded by
the oldest pair and grown greedily with the queued pairs that add the least padding, taken from
the buckets next to the seed's, while rows x width (the longest row rounded up to
`pad_to_multiple`) stays within the budget, rows within `max_batch_size`, and no pair would cost
more than `padding_tolerance` padding tokens per real token, and only pairs that arrived within
`window` seconds of the seed join it: a pair is overtaken by little more than a window's worth of
newer arrivals, so the oldest pairs wait about as long as the tokens ahead of them take (without
it, under a steady queue, newer pairs of the lengths being served would keep overtaking older
pairs of other lengths, and the oldest would wait about twice as long: loadtests/README.md).
Taken and abandoned pairs are
removed lazily when they reach a head, or by a sweep when too many pile up. A pair whose
request's deadline has passed is dropped here, through `expire`, before it reaches the model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from service.engine.types import EncodedPair, padded_width

# Width of a length bucket in tokens: 64 buckets cover a 512-token model.
_BUCKET_WIDTH = 8
# Stale queue entries (taken or abandoned items not yet swept) tolerated before a full sweep.
_STALE_SLACK = 4096
# Bucket steps of the three candidate sources of a batch: the seed's bucket, below, above.
_SOURCE_STEPS = (0, -1, 1)


class QueuedRequest:
    """One request's share of the queue (the batcher's request extends it)."""

    __slots__ = ("deadline", "done", "encoded", "items", "pace", "queued_pairs", "queued_tokens")

    def __init__(self, encoded: list[EncodedPair], tokens: int, deadline: float | None) -> None:
        self.encoded = encoded
        self.queued_pairs = len(encoded)
        self.queued_tokens = tokens
        self.deadline = deadline
        self.items: list[Item] = []  # its queued items, shortest first (per-request batching)
        # Answered, failed or abandoned: its queued items are stale and its results unwanted.
        self.done = False
        # The model's pace (real tokens/s) when it was admitted; None while unknown.
        self.pace: float | None = None


@dataclass(slots=True, eq=False)  # eq=False: an item is itself, never equal to another
class Item:
    """One queued pair: the `index`-th pair of `request`, `length` tokens, queued at `arrival`
    behind `ahead` real tokens: those queued before its request, and its request's other pairs,
    which arrive with it and are served in no order among themselves (by length). That much
    starts before it at the most unless later arrivals overtake it."""

    request: QueuedRequest
    index: int
    encoded: EncodedPair
    length: int
    arrival: float
    ahead: int = 0
    taken: bool = False


def _is_live(item: Item) -> bool:
    """Still queued: neither taken into a batch nor of a request that ended."""
    return not item.taken and not item.request.done


def bucket_of(length: int) -> int:
    """The length bucket of a pair of `length` tokens."""
    return max(length - 1, 0) // _BUCKET_WIDTH


class PairQueue:
    """The queued pairs of one batcher and the batch forming over them.

    Args:
        max_batch_tokens: padded tokens per batch (rows x stepped width); a longer pair goes alone.
        max_batch_size: rows per batch.
        padding_tolerance: padding tokens a pair may add per token of its own.
        pad_to_multiple: batch widths are rounded up to a multiple of this.
        max_length: the model's longest input; widths never pad past it.
        cross_request: batch pairs of different requests together (else one request a batch).
        window: seconds after its seed's arrival within which a pair may join a batch; None:
            any queued pair may.
        expire: called with a request whose deadline passed, found while forming a batch; it
            must mark the request done (the queue then skips its pairs).

    Attributes:
        pairs, tokens: live pairs queued and their real tokens.
    """

    def __init__(
        self,
        *,
        max_batch_tokens: int,
        max_batch_size: int,
        padding_tolerance: float,
        pad_to_multiple: int,
        max_length: int | None,
        cross_request: bool,
        expire: Callable[[QueuedRequest], None],
        window: float | None = None,
    ) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.padding_tolerance = padding_tolerance
        self.pad_to_multiple = pad_to_multiple
        self.max_length = max_length
        self.cross_request = cross_request
        self.window = window
        self._expire = expire
        self._fifo: deque[Item] = deque()
        self._buckets: list[deque[Item]] = []
        self._bucket_entries = 0
        self.pairs = 0
        self.tokens = 0

    def forget(self, request: QueuedRequest) -> int:
        """Takes an abandoned request's pairs off the counts (its entries go stale); returns
        how many were still queued."""
        dropped = request.queued_pairs
        if dropped:
            self.pairs -= request.queued_pairs
            self.tokens -= request.queued_tokens
            request.queued_pairs = request.queued_tokens = 0
        return dropped

    def has_stale(self) -> bool:
        """Whether entries remain (stale ones, when `pairs` is 0)."""
        return bool(self._fifo or self._bucket_entries)

    def add(self, request: QueuedRequest, now: float) -> None:
        buckets = self._buckets
        fifo = self._fifo
        # Behind the queue and the request's own other pairs (Item).
        behind = self.tokens + request.queued_tokens
        for index, pair in enumerate(request.encoded):
            length = pair.length
            item = Item(request, index, pair, length, now, behind - length)
            bucket = bucket_of(length)
            while bucket >= len(buckets):
                buckets.append(deque())
            buckets[bucket].append(item)
            fifo.append(item)
            request.items.append(item)
        if not self.cross_request:
            request.items.sort(key=lambda item: item.length)
        self._bucket_entries += len(request.encoded)
        self.pairs += request.queued_pairs
        self.tokens += request.queued_tokens

    def clear(self) -> None:
        self._fifo.clear()
        for bucket in self._buckets:
            bucket.clear()
        self._bucket_entries = 0

    def _sweep_if_stale(self) -> None:
        """Drops stale entries once they outnumber live ones (amortized O(1) per item); lazy
        removal alone would keep abandoned items forever in buckets that are rarely visited."""
        limit = 2 * self.pairs + _STALE_SLACK
        if len(self._fifo) <= limit and self._bucket_entries <= limit:
            return
        self._fifo = deque(filter(_is_live, self._fifo))
        for index, bucket in enumerate(self._buckets):
            self._buckets[index] = deque(filter(_is_live, bucket))
        self._bucket_entries = sum(len(bucket) for bucket in self._buckets)

    def _is_expired(self, item: Item, now: float) -> bool:
        deadline = item.request.deadline
        if deadline is not None and deadline <= now:
            self._expire(item.request)
            return True
        return False

    def oldest(self, now: float) -> Item | None:
        """The oldest live pair, dropping stale and expired ones before it; None if none."""
        fifo = self._fifo
        while fifo:
            item = fifo[0]
            if item.taken or item.request.done or self._is_expired(item, now):
                fifo.popleft()
                continue
            return item
        return None

    def arrivals(self) -> Iterator[tuple[float, int]]:
        """(arrival, length) of each live pair, oldest first."""
        for item in filter(_is_live, self._fifo):
            yield item.arrival, item.length

    def _head(self, bucket: int, now: float) -> Item | None:
        """The oldest live item of a bucket, dropping stale and expired ones before it."""
        queue = self._buckets[bucket]
        while queue:
            item = queue[0]
            if item.taken or item.request.done or self._is_expired(item, now):
                queue.popleft()
                self._bucket_entries -= 1
                continue
            return item
        return None

    def width(self, length: int) -> int:
        """The batch width a row of `length` tokens needs (`pad_to_multiple` steps)."""
        return padded_width(length, self.pad_to_multiple, self.max_length)

    def _take(self, item: Item) -> None:
        item.taken = True
        request = item.request
        request.queued_pairs -= 1
        request.queued_tokens -= item.length
        self.pairs -= 1
        self.tokens -= item.length

    def _scan(self, cursors: list[int], source: int, now: float) -> Item | None:
        """The next live item of a candidate source, moving its bucket cursor away from the
        seed's bucket past empty buckets (source 0, the seed's own bucket, never moves)."""
        step = _SOURCE_STEPS[source]
        bucket = cursors[source]
        n_buckets = len(self._buckets)
        while 0 <= bucket < n_buckets:
            item = self._head(bucket, now)
            if item is not None or step == 0:
                cursors[source] = bucket
                return item
            bucket += step
        return None

    def take_batch(self, now: float, max_tokens: int | None = None) -> list[Item] | None:
        """Removes the next batch from the queue: the oldest item plus the neighbours in length
        that add the least padding, within the budget and the padding tolerance.

        Candidates come from three sources: the seed's own bucket, the nearest non-empty bucket
        below it and the nearest above, each in arrival order. A source whose next item is
        unacceptable is closed, since the items behind it (further away in length) would be
        worse. Cost per batch: O(rows + buckets), whatever the depth of the queue.

        Args:
            now: the time deadlines are checked against.
            max_tokens: real tokens this batch may hold (its share of the work shared across
                the streams; the seed joins whatever its length); None: only the budget.
        """
        self._sweep_if_stale()
        seed = self.oldest(now)
        if seed is None:
            return None
        budget = self.max_batch_tokens
        max_rows = self.max_batch_size
        tolerance = self.padding_tolerance
        self._fifo.popleft()
        if not self.cross_request:
            return self._take_from_request(seed, max_tokens)
        self._take(seed)
        items = [seed]
        real = seed.length
        width = self.width(seed.length)
        home = bucket_of(seed.length)
        cursors = [home, home - 1, home + 1]
        heads = [self._scan(cursors, source, now) for source in range(3)]
        latest = None if self.window is None else seed.arrival + self.window
        while len(items) < max_rows:
            rows = len(items)
            if (rows + 1) * width > budget:
                break  # not even an item as long as the widest fits any more
            best: Item | None = None
            best_source = -1
            best_cost = 0
            for source, candidate in enumerate(heads):
                if candidate is None:
                    continue
                if latest is not None and candidate.arrival > latest:
                    heads[source] = None  # a bucket is in arrival order: the rest are newer
                    continue
                length = self.width(candidate.length)
                # Padding added: the candidate's own, or widening every row already in (rows of
                # the same `pad_to_multiple` step add none: every row pays its own step anyway).
                cost = width - length if length <= width else rows * (length - width)
                if (
                    best is None
                    or cost < best_cost
                    or (cost == best_cost and candidate.arrival < best.arrival)
                ):
                    best, best_source, best_cost = candidate, source, cost
            if best is None:
                break
            length = best.length
            new_width = max(width, self.width(length))
            if (rows + 1) * new_width > budget or best_cost > tolerance * length:
                heads[best_source] = None
                continue
            if max_tokens is not None and real + length > max_tokens:
                break  # its share is full
            real += length
            self._buckets[cursors[best_source]].popleft()
            self._bucket_entries -= 1
            self._take(best)
            items.append(best)
            width = new_width
            heads[best_source] = self._scan(cursors, best_source, now)
        return items

    def _take_from_request(self, seed: Item, max_tokens: int | None) -> list[Item]:
        """Per-request batching: the seed (the oldest pair, already off the FIFO) plus its
        request's other queued pairs, shortest first, within the budget, `max_batch_size` and
        `max_tokens` real tokens. Taken items stay in the FIFO and the buckets, where they are
        skipped as stale later."""
        self._take(seed)
        items = [seed]
        width = self.width(seed.length)
        real = seed.length
        for item in seed.request.items:
            if item.taken:
                continue
            new_width = max(width, self.width(item.length))
            if (
                len(items) >= self.max_batch_size
                or (len(items) + 1) * new_width > self.max_batch_tokens
                or (max_tokens is not None and real + item.length > max_tokens)
            ):
                break
            self._take(item)
            items.append(item)
            width = new_width
            real += item.length
        return items
