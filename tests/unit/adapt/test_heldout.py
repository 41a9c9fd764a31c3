"""The held-out side of `adapt train`: the split keeps an example's pairs together and takes
each task's share; the metrics measure what they say on hand-made scores."""

from __future__ import annotations

import pytest

from adapt.data import Pair
from adapt.errors import AdaptError
from adapt.heldout import metrics, split_by_example, watched_metric


def _example(task: str, number: int, samples: tuple[float, ...] = ()) -> list[Pair]:
    common = {"instruction": f"{task} q{number}", "id": f"{task}-{number}", "task": task}
    pairs = [
        Pair(response="right", label=1.0, source="ground_truth", **common),
        Pair(response="wrong", label=0.0, source="mismatch", **common),
    ]
    pairs += [
        Pair(response=f"s{i}", label=label, source="sample", decoding="sampling", **common)
        for i, label in enumerate(samples)
    ]
    return pairs


def test_the_split_holds_out_whole_examples_per_task() -> None:
    pairs = [p for t in ("a", "b") for n in range(20) for p in _example(t, n, (0.5, 0.2))]
    pairs += _example("lonely", 0)  # a task of one example is never held out
    split = split_by_example(pairs, 0.1, seed=3)
    held = {p.id for p in split.held_out}
    assert split.held_out_examples == len(held) == 4
    assert {i.split("-")[0] for i in held} == {"a", "b"}
    assert not held & {p.id for p in split.train}
    assert all(sum(p.id == i for p in split.held_out) == 4 for i in held)  # all its pairs
    assert split_by_example(pairs, 0.1, seed=3) == split
    assert split_by_example(pairs, 0.1, seed=4) != split
    nothing = split_by_example(pairs, 0.0, seed=3)
    assert nothing.held_out == [] and nothing.train == pairs
    with pytest.raises(AdaptError, match="--eval-fraction"):
        split_by_example(pairs, 1.0, seed=0)


def test_the_watched_metric_is_the_best_the_pairs_can_measure() -> None:
    assert watched_metric(_example("a", 0, (0.1, 0.9))) == "selection_rouge"
    assert watched_metric(_example("a", 0, (0.1,))) == "gt_accuracy"
    only_truth = [p for p in _example("a", 0) if p.source == "ground_truth"]
    assert watched_metric(only_truth) == "mse"
    assert watched_metric([]) is None


def test_metrics_on_hand_made_scores() -> None:
    # Task a: two examples; task b: one. Scores: ground truth, mismatch, then samples.
    pairs = (
        _example("a", 0, (0.2, 0.8)) + _example("a", 1, (0.6, 0.4)) + _example("b", 0, (0.3, 0.9))
    )
    scores = [0.9, 0.1, 0.1, 0.7] + [0.2, 0.5, 0.3, 0.9] + [0.6, 0.4, 0.8, 0.8]
    found = metrics(pairs, scores)
    # Ground truth above mismatch in a-0 and b-0, not in a-1.
    assert found["gt_accuracy"] == pytest.approx(2 / 3)
    # Picks: a-0 the 0.8 sample (label 0.8), a-1 the 0.9 one (0.4), b-0 a tie: the first (0.3).
    assert found["selection_rouge"] == pytest.approx(((0.8 + 0.4) / 2 + 0.3) / 2)
    labels = [p.label for p in pairs]
    squares = [(s - y) ** 2 for s, y in zip(scores, labels, strict=True)]
    assert found["mse"] == pytest.approx(sum(squares) / 12)
    with pytest.raises(ValueError):
        metrics(pairs, scores[:-1])
    # A scorer that cannot tell them apart (every score equal) is at chance.
    assert metrics(pairs, [0.5] * len(pairs))["gt_accuracy"] == 0.5
