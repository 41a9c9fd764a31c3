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
- A ticket's time is when the queue will have drained enough for it behind the work promised to
  the tickets issued before it, weighted by the share of tickets that are in fact claimed
  (`claim_rate`: clients that never retry must not hold room that nobody uses).
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


@dataclass(slots=True)
class Ticket:
    due: float
    expires: float
    tokens: int


class Tickets:
    """The open tickets: issued at a refusal, claimed by the request's retry, or expired."""

    def __init__(self) -> None:
        self._open: dict[bytes, Ticket] = {}
        self._expiry: list[tuple[float, bytes]] = []  # a heap; stale entries are skipped
        self._tokens = 0
        self.claim_rate = 1.0

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

    def backlog_tokens(self, excluding: bytes | None = None) -> int:
        """Tokens promised to the open tickets (but `excluding`'s own), weighted by the share
        that is claimed."""
        own = self._open.get(excluding) if excluding is not None else None
        return int((self._tokens - (own.tokens if own else 0)) * self.claim_rate)

    def issue(self, key: bytes, now: float, due: float, tokens: int) -> bool:
        """Opens (or moves) the ticket of `key` for `due`; False when the table is full."""
        if key in self._open:
            self._tokens -= self._open.pop(key).tokens
        elif len(self._open) >= MAX_TICKETS:
            return False
        expires = due + max(GRACE_MIN_S, GRACE_SHARE * (due - now))
        self._open[key] = Ticket(due, expires, tokens)
        self._tokens += tokens
        heapq.heappush(self._expiry, (expires, key))
        metrics.RETRY_TICKETS.labels(outcome="issued").inc()
        return True

    def claim(self, key: bytes) -> None:
        """The ticket's retry was admitted."""
        self._close(key, claimed=True)

    def _close(self, key: bytes, *, claimed: bool) -> None:
        self._tokens -= self._open.pop(key).tokens
        self.claim_rate += CLAIM_ALPHA * ((1.0 if claimed else 0.0) - self.claim_rate)
        metrics.RETRY_TICKETS.labels(outcome="claimed" if claimed else "expired").inc()
        if not self._open:
            self._expiry.clear()
