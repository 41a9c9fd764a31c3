"""The paired, task-stratified bootstrap on data whose answer is known: a constant difference, a
method better on every example, task weights kept, the same draws for the same seed."""

from __future__ import annotations

import random
from typing import Any

import pytest

from adapt.bootstrap import Interval, paired_bootstrap
from adapt.selection import paired_differences


def _noisy(seed: int, tasks: int = 4, per_task: int = 9) -> dict[str, list[float]]:
    rng = random.Random(seed)
    return {f"t{t}": [rng.gauss(0, 10) for _ in range(per_task + t)] for t in range(tasks)}


def test_a_constant_difference_gives_a_zero_width_interval_at_it() -> None:
    interval = paired_bootstrap({"a": [1.5] * 5, "b": [1.5] * 7}, seed=0)
    assert interval.difference == pytest.approx(1.5)
    assert interval.low == pytest.approx(1.5) and interval.high == pytest.approx(1.5)
    assert interval.share_above_zero == 1.0
    assert (interval.examples, interval.tasks) == (12, 2)


def test_paired_the_spread_of_the_scores_does_not_widen_it() -> None:
    # Rouge-L that varies a lot between examples, B always 0.02 below A: only the differences
    # are resampled, so the interval is the difference itself (an unpaired one would be wide).
    rng = random.Random(1)
    rows = []
    for i in range(20):
        b = rng.uniform(0, 0.9)
        rows.append({"task": f"t{i % 3}", "picked_rouge": {"a": b + 0.02, "b": b}})
    differences = paired_differences(rows, "a", "b")
    assert differences is not None
    interval = paired_bootstrap(differences, seed=0)
    assert interval.low == pytest.approx(2.0) and interval.high == pytest.approx(2.0)
    # Either method without a pick for one example: no comparison.
    rows[0]["picked_rouge"]["b"] = None
    assert paired_differences(rows, "a", "b") is None


def test_better_on_every_example_gives_an_interval_above_zero() -> None:
    differences = {task: [abs(v) + 0.1 for v in values] for task, values in _noisy(2).items()}
    interval = paired_bootstrap(differences, seed=0)
    assert 0 < interval.low < interval.difference < interval.high
    assert interval.share_above_zero == 1.0


def test_a_noisy_difference_around_zero_straddles_it() -> None:
    interval = paired_bootstrap(_noisy(3), seed=0)
    assert interval.low < 0 < interval.high
    assert 0 < interval.share_above_zero < 1


def test_stratified_tasks_keep_their_equal_weight() -> None:
    # Task "a": 2 examples, each +10; task "b": 8 examples at 0. The headline (mean over tasks of
    # task means) is 5; the mean over examples is 2. Resampling within each task keeps every
    # resample at exactly 5; resampling the 10 examples together would vary around 2.
    interval = paired_bootstrap({"a": [10.0, 10.0], "b": [0.0] * 8}, seed=0)
    assert interval.difference == pytest.approx(5.0)
    assert interval.low == pytest.approx(5.0) and interval.high == pytest.approx(5.0)


def test_seeded_and_the_same_draws_for_every_comparison() -> None:
    data = _noisy(4)
    first = paired_bootstrap(data, seed=7)
    assert paired_bootstrap(data, seed=7) == first
    assert paired_bootstrap(data, seed=8) != first
    # The same seed, tasks and sizes draw the same examples: a comparison whose differences are
    # twice another's gets exactly twice its interval.
    double = paired_bootstrap({t: [2 * v for v in vs] for t, vs in data.items()}, seed=7)
    assert double.low == pytest.approx(2 * first.low)
    assert double.high == pytest.approx(2 * first.high)
    assert double.share_above_zero == first.share_above_zero


def test_the_level_sets_the_quantiles() -> None:
    data = _noisy(5)
    wide = paired_bootstrap(data, seed=0, level=0.99)
    narrow = paired_bootstrap(data, seed=0, level=0.5)
    assert wide.low < narrow.low < narrow.high < wide.high
    assert isinstance(wide, Interval) and set(wide.to_dict()) == {
        "difference",
        "low",
        "high",
        "share_above_zero",
        "examples",
        "tasks",
    }


@pytest.mark.parametrize(
    ("differences", "options"),
    [
        ({}, {}),
        ({"a": [1.0], "b": []}, {}),
        ({"a": [1.0]}, {"resamples": 0}),
        ({"a": [1.0]}, {"level": 1.0}),
    ],
)
def test_refuses_what_it_cannot_bootstrap(
    differences: dict[str, list[float]], options: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        paired_bootstrap(differences, seed=0, **options)
