"""What each method of `cappy eval` picks when it has nothing to choose by."""

from __future__ import annotations

import random

from adapt.cache import SampleRecord
from adapt.selection import picks


def test_picks_without_logprobs_or_scores() -> None:
    records = [
        SampleRecord("e", d, 0, i, f"t{i}", logprobs=None)
        for i, d in enumerate(["sampling", "top_p_0.95", "greedy"])
    ]
    chosen = picks(
        records,
        [0.1, 0.5, 0.5],
        None,
        nucleus={"top_p_0.95"},
        greedy={"greedy"},
        rng=random.Random(0),
    )
    assert chosen["self_scoring"] is None and chosen["cappy"] is None
    assert chosen["oracle"] == 1  # ties: the first
    assert (chosen["nucleus"], chosen["greedy"]) == (1, 2)
    assert chosen["cappy@17"] is None and chosen["self_scoring@4"] is None
