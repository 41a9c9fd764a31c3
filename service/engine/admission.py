"""Admission control of the dynamic batcher: whether a request may join the queue now, and when
to come back if not. Plain, synchronous code over the queue (queue.py) and the model's pace; the
async batcher (batcher.py) asks it before queueing and tells it each batch's timing.

- The pace: real tokens per busy second of the whole model (every stream, re-scoring turns
  included), averaged over recent batches. Queued tokens at that pace give the expected wait.
  It counts only once it has measured enough work (`MIN_PACE_BATCHES` batches holding at least
  a full batch's budget of tokens): one small first batch, slowed by the first run of a shape
  or by the tokenization of the requests beside it, would otherwise refuse a fresh server's
  first burst. Until then only the token cap and the oldest pair's age refuse.
- A request is refused at once with `Overloaded` and a Retry-After of when the queue will have
  drained enough for it (at the pace: the expected wait, the queue's model time times the
  head's lag below, falls `lag` seconds a second while it drains), when the queue is full
  (`max_queue_tokens`), when its expected wait is over `max_queue_wait_s` (or its oldest pair
  has already waited that long: the check on a pace that lags a slowing host), or when the
  request would miss its deadline behind the queue.
- A request that can never be answered, however empty the queue, is `RequestTooLarge` (413): more
  tokens than the queue may hold, or alone more model time than its deadline leaves.

- The head's lag: the pace says how fast the queue drains, not in what order. Pairs that join
  an older pair's batch by length overtake the pairs of other lengths, and the oldest pairs wait
  longer than the queued tokens ahead of them take at the pace. Each batch reports its seed (the
  oldest pair when it was formed): its queue time over the time the tokens ahead of it (those
  queued before its request, and its request's other pairs, which the queue serves in any order)
  were expected to take, at the pace of its admission. The expected wait is scaled by a high
  quantile of that ratio over recent seeds (never below 1), so that the queue's oldest pairs,
  the tail of its queue time, keep the limit. A mean over every pair would not: the overtaking
  pairs wait less than predicted and pull it below 1 while the tail waits more; and a mean over
  seeds leaves half of them past the limit. (The queue's window, queue.py, keeps the
  overtaking itself small.)
- When the oldest pair has already waited past the limit, Retry-After is when the queue,
  drained oldest first at the expected pace, will have a head young enough again; not the
  head's excess age, which says nothing of how long a burst admitted at once takes to drain.

- A refusal's Retry-After is a promise the queue keeps (tickets.py): the refused request gets a
  ticket, keyed by its content, for when the queue will have room for it behind the retries
  promised before it, and while tickets are open newcomers are held a little under the limit
  so that the retries find the room they were promised.

Admission looks at the queue ahead of a request, not at its size: large requests are admitted as
readily as small ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from service import metrics
from service.engine.errors import DeadlineExceeded, Overloaded, RequestTooLarge
from service.engine.queue import Item, PairQueue
from service.engine.tickets import EARLY_S, HEADROOM_SHARE, Room, Tickets

# Weight of the newest batch in the pace averages behind admission and Retry-After.
_THROUGHPUT_ALPHA = 0.2
# Batches a pace must have measured before it refuses work (with at least `min_tokens` in them):
# the first batches of a fresh server are small and slow (a shape's first run, tokenization of
# the requests beside them), and one of them alone once set a pace that refused a fresh burst.
MIN_PACE_BATCHES = 4
# The head's lag: the quantile of the seeds' ratios it tracks, its step (a seed above it raises it
# by about 5%, one below lowers it by about 0.15%), its cap, and the shortest predicted wait a
# seed is measured against (a shorter one is mostly the batch in flight and the batch forming).
# 0.97: the 0.9 quantile left 7-12% of a flood's pairs past the limit (loadtests/README.md).
LAG_QUANTILE = 0.97
_LAG_STEP = 0.05
_LAG_MAX = 4.0
_LAG_MIN_PREDICTED_S = 1.0
_RETRY_AFTER_MIN_S = 0.1
_RETRY_AFTER_MAX_S = 60.0
_RETRY_AFTER_UNKNOWN_S = 1.0


class Pace:
    """The pace of the whole model: real tokens and busy seconds, each averaged over recent
    batches. A batch's busy seconds run from the last completion (or, after an idle spell:
    nothing queued, nothing running, from when the model took its first batch again: `begin`)
    to its own completion, so batches that overlap on several streams are not counted twice, and
    a gap while pairs waited (a batch formed late behind a busy event loop) is counted: the pace
    is the rate at which the queue drains, which is what the expected wait and Retry-After need.

    Until it has measured `min_batches` batches holding at least `min_tokens` real tokens the
    pace is unknown (None): the work so far is summed, and its average then seeds the moving
    averages, so no single early batch sets the pace.
    """

    def __init__(self, min_tokens: int = 1, min_batches: int = MIN_PACE_BATCHES) -> None:
        self.min_tokens = min_tokens
        self.min_batches = min_batches
        # Sums of the work measured so far until the pace is known; per-batch averages after.
        self._tokens = 0.0
        self._seconds = 0.0
        self._batches = 0
        self._known = False
        self._mark: float | None = None

    def idle(self) -> None:
        """The model had nothing to run: the gap until the next batch is not its pace."""
        self._mark = None

    def begin(self, at: float) -> None:
        """A batch was handed to the model at `at`: after an idle spell, busy time counts from
        the first such moment, so that a batch which started later on another stream but
        finished first does not leave out the time the earlier one ran before it."""
        if self._mark is None:
            self._mark = at

    def track(self, tokens: int, started: float, finished: float) -> None:
        """Adds a finished batch of `tokens` real tokens that ran from `started` to `finished`."""
        mark = self._mark
        busy = max(0.0, finished - (started if mark is None else mark))
        self._mark = finished if mark is None else max(mark, finished)
        if not self._known:
            self._tokens += tokens
            self._seconds += busy
            self._batches += 1
            if (
                self._batches >= self.min_batches
                and self._tokens >= self.min_tokens
                and self._seconds > 0
            ):
                self._known = True
                self._tokens /= self._batches
                self._seconds /= self._batches
            return
        alpha = _THROUGHPUT_ALPHA
        self._tokens += alpha * (tokens - self._tokens)
        self._seconds += alpha * (busy - self._seconds)

    def tokens_per_second(self) -> float | None:
        """None until enough work has been measured."""
        if not self._known or self._seconds <= 0:
            return None
        return self._tokens / self._seconds


class HeadLag:
    """How much longer the queue's oldest pairs wait than the pace predicted (the module's
    docstring): the `LAG_QUANTILE` quantile of recent batch seeds' ratios of waited over
    predicted, at least 1 and at most `_LAG_MAX`, tracked by the standard stochastic rule (a
    multiplicative step up by `LAG_QUANTILE` for a seed above it, down by the rest for one at
    or below: it settles where that share of seeds lies below it)."""

    def __init__(self) -> None:
        self.factor = 1.0

    def observe(self, waited: float, predicted: float) -> None:
        """Adds a seed that waited `waited` seconds where `predicted` were expected; a seed
        predicted to wait under `_LAG_MIN_PREDICTED_S` says too little and is skipped."""
        if predicted < _LAG_MIN_PREDICTED_S:
            return
        above = waited / predicted > self.factor
        step = _LAG_STEP * (LAG_QUANTILE if above else LAG_QUANTILE - 1.0)
        self.factor = min(_LAG_MAX, max(1.0, self.factor * math.exp(step)))


class Admission:
    """Admission to one batcher's queue.

    Args:
        queue: the queue admitted requests join (read here, never changed).
        max_queue_tokens, max_queue_wait_s, default_timeout_s: as in `BatcherConfig`.
        min_pace_tokens: real tokens the pace must have measured before it refuses work (the
            batcher passes its batch budget).
        clock: the monotonic clock of arrivals and deadlines (the batcher's).

    Attributes:
        pace: the model's pace; the batcher reports each batch to it.
        lag: the head's lag; the batcher reports each batch's seed (`observe_seed`).
        tickets: the promises of recent refusals (tickets.py).
    """

    def __init__(
        self,
        queue: PairQueue,
        *,
        max_queue_tokens: int,
        max_queue_wait_s: float | None,
        default_timeout_s: float | None,
        min_pace_tokens: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._queue = queue
        self._clock = clock
        self.max_queue_tokens = max_queue_tokens
        self.max_queue_wait_s = max_queue_wait_s
        self.default_timeout_s = default_timeout_s
        self.pace = Pace(min_tokens=min_pace_tokens)
        self.lag = HeadLag()
        self.tickets = Tickets()

    def model_time(self, tokens: int) -> float | None:
        """Seconds of the model (every stream busy) that `tokens` take at its recent pace; None
        while the pace is unknown (too little work measured)."""
        rate = self.pace.tokens_per_second()
        return tokens / rate if rate else None

    def expected_wait(self, tokens: int | None = None) -> float | None:
        """Seconds until `tokens` (default: the queued tokens) will have drained, as the queue's
        oldest pairs in fact wait: their model time scaled by the head's lag; None while the
        pace is unknown."""
        seconds = self.model_time(self._queue.tokens if tokens is None else tokens)
        return None if seconds is None else seconds * self.lag.factor

    def observe_seed(self, seed: Item, started: float) -> None:
        """A batch whose oldest pair, `seed`, started on the model at `started`: its queue time
        against the model time of the tokens ahead of it at the pace of its admission."""
        pace = seed.request.pace
        if pace:
            self.lag.observe(started - seed.arrival, seed.ahead / pace)

    def deadline(self, deadline: float | None) -> float | None:
        """The request's deadline (now + `default_timeout_s` when it brings none); raises
        DeadlineExceeded when it has passed."""
        now = self._clock()
        if deadline is None and self.default_timeout_s is not None:
            deadline = now + self.default_timeout_s
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded()
        return deadline

    def check_queue(self) -> None:
        """Raises `Overloaded` when the queue would refuse any request now (so that a caller
        can be refused before its request is tokenized)."""
        refusal = self.retry_after(0)
        if refusal is not None:
            raise self._overloaded(refusal)

    def admit(self, tokens: int, deadline: float | None, key: bytes | None = None) -> float:
        """Checks a request of `tokens` tokens due by `deadline` (absolute, monotonic) against
        the queue; returns the time of admission, its pairs' arrival. `key` (tickets.request_key)
        finds the ticket of an earlier refusal of the same request, and gets this one a ticket
        if it is refused; without it no ticket is kept.

        Raises:
            RequestTooLarge: it needs more than `max_queue_tokens`, or alone more model time
                than its deadline leaves at the recent pace.
            DeadlineExceeded: the deadline has passed.
            Overloaded: the queue is full, its expected wait too long, or the request would
                miss its deadline behind it.
        """
        if tokens > self.max_queue_tokens:
            metrics.REQUESTS_REJECTED.labels(reason="too_large").inc()
            raise RequestTooLarge(tokens, self.max_queue_tokens)
        now = self._clock()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded()
        remaining = None if deadline is None else deadline - now
        own = self.model_time(tokens)
        if own is not None and remaining is not None and own > remaining:
            # Even alone it would hold the model past its deadline (and every request queued
            # behind it), to be answered 504 in the end.
            metrics.REQUESTS_REJECTED.labels(reason="too_large").inc()
            limit = int(tokens * remaining / own)
            raise RequestTooLarge(
                tokens,
                limit,
                f"the request needs {tokens} tokens, about {own:.0f} s of model time at the "
                f"current pace, more than its {remaining:.0f} s deadline allows (about {limit} "
                "tokens); send fewer or shorter texts",
            )
        tickets = self.tickets
        tickets.sweep(now)
        ticket = tickets.get(key)
        early = ticket is not None and now < ticket.due - EARLY_S
        # A retry with a ticket may fill the queue to the limit; a newcomer, while tickets are
        # open, only to the share the promised retries leave. A request that comes before its
        # ticket's time (an early retry, or another client's first try of the same texts) is
        # a newcomer, and keeps the ticket's place if refused.
        newcomer = ticket is None or early
        share = 1.0 - HEADROOM_SHARE if newcomer and len(tickets) else 1.0
        if self.retry_after(tokens, remaining, share=share) is None:
            if key is not None and ticket is not None:
                tickets.claim(key)
            return now
        if ticket is not None and now < ticket.due:
            # Before its time (an early retry, or within `EARLY_S` of it and the queue not yet
            # drained): the time left; the ticket keeps its place.
            raise self._overloaded(max(_RETRY_AFTER_MIN_S, ticket.due - now))
        # Refused: when the queue will have room for it behind the retries promised before it.
        promise = self.retry_after(tokens, remaining) or _RETRY_AFTER_MIN_S
        room = self._room()
        if room is not None:
            promise = max(promise, tickets.schedule(now, room) - now)
        promise = min(_RETRY_AFTER_MAX_S, max(_RETRY_AFTER_MIN_S, promise))
        if key is not None and promise < _RETRY_AFTER_MAX_S:
            tickets.issue(key, now, now + promise, tokens, room)
        raise self._overloaded(promise)

    def _room(self) -> Room | None:
        """The queue now for the tickets' schedule (tickets.Room); None without a wait limit or
        a measured pace."""
        rate = self.pace.tokens_per_second()
        if rate is None or self.max_queue_wait_s is None:
            return None
        # The queued tokens at which the expected wait is the limit.
        limit = self.max_queue_wait_s * rate / self.lag.factor
        return Room(self._queue.tokens - limit, HEADROOM_SHARE * limit, rate)

    def retry_after(
        self, tokens: int, remaining: float | None = None, *, share: float = 1.0
    ) -> float | None:
        """None when a request of `tokens` tokens (with `remaining` seconds to its deadline) may
        be queued now, with the expected wait held to `share` of the limit; else the seconds
        until the queue will have drained enough for it, by the model's recent pace (at least
        `_RETRY_AFTER_UNKNOWN_S` while the pace is unknown)."""
        queued = self._queue.tokens
        # Any request brings at least one token: a full queue refuses before tokenizing.
        over_cap = queued + max(tokens, 1) - self.max_queue_tokens
        wait = self.expected_wait(queued)
        # Each is how long the queue has to drain before the request would be admitted. The
        # queue drains at the pace, so an expected wait (its model time times the head's lag)
        # falls `lag` seconds a second: an excess wait is drained in excess / lag.
        lag = self.lag.factor
        needed = [0.0]
        if over_cap > 0:
            needed.append(max(_RETRY_AFTER_MIN_S, self.model_time(over_cap) or 0.0))
        if self.max_queue_wait_s is not None:
            if wait is not None:
                needed.append((wait - share * self.max_queue_wait_s) / lag)
            # The estimate's check, and the only wait rule before the pace is known: the oldest
            # queued pair has waited longer than the limit (the pace fell, e.g. a busy host, or
            # was never measured), so the queue drains slower than it says. A measured age.
            now = self._clock()
            oldest = self._queue.oldest(now)
            if oldest is not None and (age := now - oldest.arrival - self.max_queue_wait_s) > 0:
                needed.append(max(age, self._young_head_in(now)))
        if remaining is not None and wait is not None:
            # Behind this queue it would miss its deadline: refused now, not a 504 later. The lag
            # is the queue's (later arrivals overtaking its oldest pairs); the request's own
            # pairs take their model time, as the too-large rule counts them, so an idle server
            # never refuses a request that its deadline allows alone.
            needed.append((wait + (self.model_time(tokens) or 0.0) - remaining) / lag)
        seconds = max(needed)
        if seconds <= 0:
            return None
        if wait is None:  # no pace to say when the queue drains
            seconds = max(seconds, _RETRY_AFTER_UNKNOWN_S)
        return min(_RETRY_AFTER_MAX_S, max(_RETRY_AFTER_MIN_S, seconds))

    def _young_head_in(self, now: float) -> float:
        """Seconds until the queue, drained oldest first at the expected pace, has a head that
        has waited no longer than the limit (0 while the pace is unknown)."""
        assert self.max_queue_wait_s is not None
        per_token = self.expected_wait(1)
        if per_token is None:
            return 0.0
        ahead = 0
        for arrival, length in self._queue.arrivals():
            if now + ahead * per_token - arrival <= self.max_queue_wait_s:
                break
            ahead += length
        return ahead * per_token

    @staticmethod
    def _overloaded(retry_after: float) -> Overloaded:
        """Counts a refusal."""
        metrics.REQUESTS_REJECTED.labels(reason="overloaded").inc()
        return Overloaded(retry_after)
