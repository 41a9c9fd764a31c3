"""Retry tickets on their own (service/engine/tickets.py): the request key, issuing, claiming,
moving and expiring tickets, the claim rate and the promised backlog. Admission's use of them
is in test_admission.py."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine import tickets as tickets_module
from service.engine.tickets import CLAIM_ALPHA, GRACE_MIN_S, Tickets, request_key


def ids(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_the_key_is_the_requests_token_ids_in_order() -> None:
    key = request_key([ids(0, 5, 2), ids(0, 6, 7, 2)])
    assert key == request_key([ids(0, 5, 2), ids(0, 6, 7, 2)])
    assert key != request_key([ids(0, 6, 7, 2), ids(0, 5, 2)])  # another order
    assert key != request_key([ids(0, 5, 2, 0, 6, 7, 2)])  # the same ids, other pairs
    assert len(key) == 16


def test_issue_claim_and_the_backlog() -> None:
    tickets = Tickets()
    assert tickets.issue(b"a", now=0.0, due=2.0, tokens=300)
    assert tickets.issue(b"b", now=0.0, due=3.0, tokens=100)
    assert len(tickets) == 2 and tickets.backlog_tokens() == 400
    assert tickets.backlog_tokens(excluding=b"a") == 100
    ticket = tickets.get(b"a")
    assert ticket is not None and ticket.due == 2.0 and ticket.expires == 2.0 + GRACE_MIN_S
    assert tickets.get(None) is None and tickets.get(b"c") is None
    tickets.claim(b"a")
    assert len(tickets) == 1 and tickets.backlog_tokens() == 100 and tickets.claim_rate == 1.0
    # Moved: one ticket, its new time, its tokens counted once; the old expiry is stale.
    assert tickets.issue(b"b", now=1.0, due=21.0, tokens=100)
    assert len(tickets) == 1 and tickets.backlog_tokens() == 100
    ticket = tickets.get(b"b")
    assert ticket is not None and ticket.expires == pytest.approx(21.0 + 0.5 * 20.0)
    tickets.sweep(3.0 + GRACE_MIN_S + 1)  # past the old expiry: still open
    assert len(tickets) == 1


def test_unclaimed_tickets_expire_and_lower_the_claim_rate() -> None:
    tickets = Tickets()
    for i in range(10):
        tickets.issue(b"%d" % i, now=0.0, due=1.0, tokens=100)
    tickets.sweep(1.0 + GRACE_MIN_S)  # not yet past the grace
    assert len(tickets) == 10
    tickets.sweep(1.0 + GRACE_MIN_S + 0.01)
    assert len(tickets) == 0 and tickets.backlog_tokens() == 0
    assert tickets.claim_rate == pytest.approx((1 - CLAIM_ALPHA) ** 10)
    tickets.issue(b"x", now=10.0, due=11.0, tokens=1_000)
    assert tickets.backlog_tokens() == int(1_000 * (1 - CLAIM_ALPHA) ** 10)


def test_a_full_table_issues_no_more_tickets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tickets_module, "MAX_TICKETS", 2)
    tickets = Tickets()
    assert tickets.issue(b"a", 0.0, 1.0, 10) and tickets.issue(b"b", 0.0, 1.0, 10)
    assert not tickets.issue(b"c", 0.0, 1.0, 10)
    assert tickets.issue(b"a", 0.0, 2.0, 10)  # moving an open one still works
    assert len(tickets) == 2
