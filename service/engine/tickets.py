"""Retry tickets: a refusal's Retry-After is a promise, and the queue keeps it.

Under a flood, room in the queue opens a little at a time as it drains, and whoever arrives at
that moment takes it: a refused client that comes back when Retry-After said competes with every
newcomer, and gets in at once or many seconds later, whatever the header promised. So a refusal
records a ticket for its request (keyed by the request's content: a retry sends the same texts)
with the time it was told to come back, and admission (admission.py) keeps room for the tickets:

- While tickets are open, a newcomer is admitted only while the expected wait is within
  `1 - HEADROOM_SHARE` of the limit; a ticket's retry, from `EARLY_S` before its time on, within
  the whole limit. Every admitted pair still keeps the limit; the queue under a flood simply
  holds newcomers a little shorter. With no ticket open nothing changes.
- A ticket's time is the schedule's (`schedule`): the earliest time at which the queue, draining
  at the model's pace, will have a retry's room behind the retries promised before it, each
  arriving at its own time with its tokens weighted by the share of tickets that are in fact
  claimed (`claim_rate`: clients that never retry must not hold room that nobody uses). Between
  two promised retries the queue drains, and newcomers refill it only to their share: so the
  retries promised over the next seconds delay a new one only by the part of their work the
  drain has not absorbed by then, not by all of it.
- A request before its ticket's time (an early retry, or another client's first try of the
  same texts) is a newcomer; refused, it is told the time left: the ticket keeps its place.
- A ticket not claimed within its grace (`GRACE_MIN_S`, or `GRACE_SHARE` of its wait if longer)
  after its time expires and counts as unclaimed.

Two clients that send the same texts share a ticket: the first to come back claims it, the other
is a newcomer again. Plain synchronous code over a monotonic clock, like admission.py.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from service import defaults, metrics

# Share of the wait limit kept for promised retries while tickets are open.
HEADROOM_SHARE = defaults.RETRY_HEADROOM_SHARE
# How early a retry may come and still claim its ticket (the header is rounded up to whole
# seconds, so a client that obeys it is never early; this allows for clocks and rounding).
EARLY_S = 0.5
# How long after its time a ticket waits to be claimed: at least GRACE_MIN_S, or GRACE_SHARE of
# the wait it was promised.
GRACE_MIN_S = 2.0
GRACE_SHARE = 0.5
# Weight of each ticket's outcome (claimed or expired) in the claim rate; the rate starts at 1
# (every refused client comes back) and learns from the outcomes.
CLAIM_ALPHA = 0.05
# Most tickets held at once; past it a refusal says when to come back without a ticket.
MAX_TICKETS = 100_000


def request_key(input_ids: Iterable[np.ndarray]) -> bytes:
    """A request's key: a digest of its pairs' token ids, in order (a retry sends the same)."""
    digest = hashlib.blake2b(digest_size=16)
    for ids in input_ids:
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(np.ascontiguousarray(ids).tobytes())
    return digest.digest()


@dataclass(frozen=True, slots=True)
class Room:
    """What the schedule needs of the queue now, in tokens: `over`, how many it holds past the
    most a retry may find (negative: that much room); `headroom`, how far under that newcomers
    stop while tickets are open; `rate`, how many the model drains a second."""

    over: float
    headroom: float
    rate: float


@dataclass(slots=True)
class Ticket:
    due: float
    expires: float


class Tickets:
    """The open tickets: issued at a refusal, claimed by the request's retry, or expired."""

    def __init__(self) -> None:
        self._open: dict[bytes, Ticket] = {}
        self._expiry: list[tuple[float, bytes]] = []  # a heap; stale entries are skipped
        self.claim_rate = 1.0
        # The schedule's tail: the time of the latest promised retry, and the tokens the queue
        # was expected to hold past a retry's room just after that retry joins it.
        self._last_due = -math.inf
        self._last_over = 0.0

    def __len__(self) -> int:
        return len(self._open)

    def sweep(self, now: float) -> None:
        """Expires the tickets whose grace has passed (each an unclaimed outcome)."""
        while self._expiry and self._expiry[0][0] < now:
            expires, key = heapq.heappop(self._expiry)
            ticket = self._open.get(key)
            if ticket is not None and ticket.expires == expires:
                self._close(key, claimed=False)

    def get(self, key: bytes | None) -> Ticket | None:
        return None if key is None else self._open.get(key)

    def schedule(self, now: float, room: Room) -> float:
        """The earliest time at which a retry promised now finds its room: the queue drains at
        `room.rate`, behind the retries promised before it (module docstring)."""
        start, over = self._from(now, room)
        return start + max(over, 0.0) / room.rate

    def _from(self, now: float, room: Room) -> tuple[float, float]:
        """Where a new promise starts: the later of now and the latest promised retry's time,
        and how far past a retry's room the queue will be then (the larger of what the
        schedule expected and what the queue now, drained until then, says)."""
        if self._last_due > now:
            drained = room.over - room.rate * (self._last_due - now)
            return self._last_due, max(self._last_over, drained)
        return now, max(room.over, self._last_over - room.rate * (now - self._last_due))

    def issue(
        self, key: bytes, now: float, due: float, tokens: int, room: Room | None = None
    ) -> bool:
        """Opens (or moves) the ticket of `key` for `due` (no earlier than `schedule` said),
        and with `room` (the queue's now) adds its retry to the schedule; False when the table
        is full."""
        if key in self._open:
            del self._open[key]
        elif len(self._open) >= MAX_TICKETS:
            return False
        expires = due + max(GRACE_MIN_S, GRACE_SHARE * (due - now))
        self._open[key] = Ticket(due, expires)
        if room is not None:
            # At `due` the queue has drained to its room or further, but newcomers refill it to
            # their share; then the retry is expected to add its tokens, by the claim rate.
            start, over = self._from(now, room)
            over = max(over - room.rate * (due - start), -room.headroom)
            self._last_due = due
            self._last_over = over + self.claim_rate * tokens
        heapq.heappush(self._expiry, (expires, key))
        metrics.RETRY_TICKETS.labels(outcome="issued").inc()
        return True

    def claim(self, key: bytes) -> None:
        """The ticket's retry was admitted."""
        self._close(key, claimed=True)

    def _close(self, key: bytes, *, claimed: bool) -> None:
        del self._open[key]
        self.claim_rate += CLAIM_ALPHA * ((1.0 if claimed else 0.0) - self.claim_rate)
        metrics.RETRY_TICKETS.labels(outcome="claimed" if claimed else "expired").inc()
        if not self._open:  # every promise kept or lapsed: what came back is in the queue
            self._expiry.clear()
            self._last_due, self._last_over = -math.inf, 0.0
