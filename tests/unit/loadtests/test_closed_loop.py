"""loadtests/closed_loop.py: argmax agreement and the loopback-only targets (the loop itself runs
against a fake server in test_bench.py)."""

from __future__ import annotations

import pytest

from loadtests.closed_loop import Outcome, argmax_agreement, check_loopback


def test_argmax_agreement_counts_single_candidates_apart() -> None:
    outcomes = [
        Outcome(id=1, pairs=4, status=200, latency_s=0.1, index=2),
        Outcome(id=2, pairs=4, status=200, latency_s=0.1, index=0),
        Outcome(id=3, pairs=1, status=200, latency_s=0.1, index=0),
        Outcome(id=4, pairs=4, status=200, latency_s=0.1, index=1),
    ]
    result = argmax_agreement(outcomes, {"1": 2, "2": 3, "3": 0})
    assert result["agreement"] == 0.5
    assert result["compared"] == 2
    assert result["single_candidate"] == 1
    assert result["not_in_reference"] == 1
    assert result["disagreeing_ids"] == [2]


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:9"])
def test_loopback_targets_are_accepted(url: str) -> None:
    check_loopback(url)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:1"])
def test_other_targets_are_refused(url: str) -> None:
    with pytest.raises(SystemExit, match="loopback"):
        check_loopback(url)
