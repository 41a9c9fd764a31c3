"""Retry tickets on their own (service/engine/tickets.py): the request key, issuing, claiming,
moving and expiring tickets, the claim rate and the schedule of promised retries. Admission's
use of them is in test_admission.py."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine import tickets as tickets_module
from service.engine.tickets import CLAIM_ALPHA, GRACE_MIN_S, Room, Tickets, request_key


def ids(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_the_key_is_the_requests_token_ids_in_order() -> None:
    key = request_key([ids(0, 5, 2), ids(0, 6, 7, 2)])
    assert key == request_key([ids(0, 5, 2), ids(0, 6, 7, 2)])
    assert key != request_key([ids(0, 6, 7, 2), ids(0, 5, 2)])  # another order
    assert key != request_key([ids(0, 5, 2, 0, 6, 7, 2)])  # the same ids, other pairs
    assert len(key) == 16


def test_issue_claim_and_move() -> None:
    tickets = Tickets()
    assert tickets.issue(b"a", now=0.0, due=2.0, tokens=300)
    assert tickets.issue(b"b", now=0.0, due=3.0, tokens=100)
    assert len(tickets) == 2
    ticket = tickets.get(b"a")
    assert ticket is not None and ticket.due == 2.0 and ticket.expires == 2.0 + GRACE_MIN_S
    assert tickets.get(None) is None and tickets.get(b"c") is None
    tickets.claim(b"a")
    assert len(tickets) == 1 and tickets.claim_rate == 1.0
    # Moved: one ticket at its new time; the old expiry is stale.
    assert tickets.issue(b"b", now=1.0, due=21.0, tokens=100)
    assert len(tickets) == 1
    ticket = tickets.get(b"b")
    assert ticket is not None and ticket.expires == pytest.approx(21.0 + 0.5 * 20.0)
    tickets.sweep(3.0 + GRACE_MIN_S + 1)  # past the old expiry: still open
    assert len(tickets) == 1


# A queue that drains 100 tokens a second, 100 tokens past a retry's room, newcomers held 200
# tokens under it.
FULL = Room(over=100.0, headroom=200.0, rate=100.0)


def _promise(tickets: Tickets, key: bytes, now: float, room: Room, tokens: int = 100) -> float:
    """Issues `key` the ticket the schedule says; its wait."""
    due = tickets.schedule(now, room)
    assert tickets.issue(key, now, due, tokens, room)
    return due - now


def test_promised_retries_are_scheduled_one_behind_another() -> None:
    tickets = Tickets()
    assert tickets.schedule(0.0, Room(-50.0, 200.0, 100.0)) == 0.0  # room now: no wait
    # Refused together: each after the queue's excess and the retries promised before it.
    assert [_promise(tickets, b"%d" % i, 0.0, FULL) for i in range(3)] == [1.0, 2.0, 3.0]
    # The tokens of a retry count by the share of tickets that are claimed.
    tickets.claim_rate = 0.25
    assert _promise(tickets, b"x", 0.0, FULL, tokens=400) == 4.0
    assert _promise(tickets, b"y", 0.0, FULL) == 5.0  # x's 400 tokens held 1 s, not 4 s


def test_the_queue_drains_between_promised_retries() -> None:
    """A retry promised later is not held behind the work of one promised earlier that the
    model will have drained by then (a backlog of every open ticket would say 2 s, not 1 s)."""
    tickets = Tickets()
    assert _promise(tickets, b"a", 0.0, FULL) == 1.0  # its retry due at 1 s
    # At 5 s newcomers have refilled the queue to the same excess: a's retry is long drained.
    assert _promise(tickets, b"b", 5.0, FULL) == 1.0
    # Half a second later b's retry (due at 6 s) is still ahead: behind it.
    assert _promise(tickets, b"c", 5.5, FULL) == pytest.approx(1.5)
    # The queue now worse than the schedule expected: the queue says.
    assert tickets.schedule(5.5, Room(1_000.0, 200.0, 100.0)) == pytest.approx(5.5 + 10.0)


def test_retries_share_the_headroom_newcomers_leave() -> None:
    """With room in the queue, the first retries are due at once; newcomers fill the queue to
    their share meanwhile, so once the promised retries' tokens pass the headroom, the next
    one waits for the drain."""
    tickets = Tickets()
    empty = Room(over=-1_000.0, headroom=200.0, rate=100.0)
    assert [_promise(tickets, b"%d" % i, 0.0, empty) for i in range(4)] == [0.0, 0.0, 0.0, 1.0]
    # Every ticket closed: the schedule starts again from the queue.
    for i in range(4):
        tickets.claim(b"%d" % i)
    assert tickets.schedule(0.0, empty) == 0.0


def test_unclaimed_tickets_expire_and_lower_the_claim_rate() -> None:
    tickets = Tickets()
    for i in range(10):
        tickets.issue(b"%d" % i, now=0.0, due=1.0, tokens=100)
    tickets.sweep(1.0 + GRACE_MIN_S)  # not yet past the grace
    assert len(tickets) == 10
    tickets.sweep(1.0 + GRACE_MIN_S + 0.01)
    assert len(tickets) == 0
    assert tickets.claim_rate == pytest.approx((1 - CLAIM_ALPHA) ** 10)


def test_a_full_table_issues_no_more_tickets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tickets_module, "MAX_TICKETS", 2)
    tickets = Tickets()
    assert tickets.issue(b"a", 0.0, 1.0, 10) and tickets.issue(b"b", 0.0, 1.0, 10)
    assert not tickets.issue(b"c", 0.0, 1.0, 10)
    assert tickets.issue(b"a", 0.0, 2.0, 10)  # moving an open one still works
    assert len(tickets) == 2
