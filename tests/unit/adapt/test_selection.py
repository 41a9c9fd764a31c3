"""What each method of `cappy eval` picks: with nothing to choose by, the mean against the sum of
log-probabilities; and Cappy's per-task wins, losses and ties."""

from __future__ import annotations

import random

import pytest

from adapt.cache import SampleRecord
from adapt.selection import TIE_WITHIN, picks, sum_logprob, task_outcomes

DECODINGS = ["sampling", "top_p_0.95", "greedy"]


def _pick(records: list[SampleRecord]) -> dict[str, int | None]:
    return picks(
        records,
        [0.1, 0.5, 0.5][: len(records)],
        None,
        nucleus={"top_p_0.95"},
        greedy={"greedy"},
        rng=random.Random(0),
    )


def test_picks_without_logprobs_or_scores() -> None:
    records = [SampleRecord("e", d, 0, i, f"t{i}", logprobs=None) for i, d in enumerate(DECODINGS)]
    chosen = _pick(records)
    assert chosen["self_scoring"] is None and chosen["cappy"] is None
    assert chosen["self_scoring_sum"] is None
    assert chosen["oracle"] == 1  # ties: the first
    assert (chosen["nucleus"], chosen["greedy"]) == (1, 2)
    assert chosen["cappy@17"] is None and chosen["self_scoring@4"] is None
    assert chosen["self_scoring_sum@4"] is None


def test_the_sum_favours_short_samples_the_mean_does_not() -> None:
    records = [
        # Long and confident per token: mean -0.1, sum -1.0.
        SampleRecord("e", "sampling", 0, 0, "ten words", logprobs=(-0.1,) * 10),
        # Short and less confident: mean -0.5, sum -0.5.
        SampleRecord("e", "top_p_0.95", 0, 1, "short", logprobs=(-0.5,)),
        # The same sum as the short one, later: ties go to the first.
        SampleRecord("e", "greedy", 0, 2, "two words", logprobs=(-0.25, -0.25)),
    ]
    assert [sum_logprob(r) for r in records] == pytest.approx([-1.0, -0.5, -0.5])
    chosen = _pick(records)
    assert chosen["self_scoring"] == 0
    assert chosen["self_scoring_sum"] == 1
    # 1 sample: the first nucleus sample for both.
    assert chosen["self_scoring@1"] == chosen["self_scoring_sum@1"] == 1


def test_no_tokens_no_sum() -> None:
    assert sum_logprob(SampleRecord("e", "greedy", 0, 0, "", logprobs=())) is None


def test_task_outcomes_count_wins_losses_and_ties() -> None:
    cappy = {"a": 30.0, "b": 20.0, "c": 10.0, "d": 5.0, "e": 7.004}
    other = {"a": 25.0, "b": 20.01, "c": 10.0, "d": 8.0, "e": 7.0}
    outcome = task_outcomes(cappy, other)
    assert outcome is not None
    # a: +5 win; b: -0.01 loss; c: exactly equal, tie; d: -3 loss; e: +0.004 < 0.005, tie.
    assert (outcome["wins"], outcome["losses"], outcome["ties"]) == (1, 2, 2)
    assert outcome["differences"] == pytest.approx(
        {"a": 5.0, "b": -0.01, "c": 0.0, "d": -3.0, "e": 0.004}
    )
    assert TIE_WITHIN == 0.005
    # A method without a mean for some task (no scorer, no log-probabilities): no outcome.
    assert task_outcomes({**cappy, "a": None}, other) is None
    assert task_outcomes(cappy, {**other, "e": None}) is None
