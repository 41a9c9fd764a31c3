"""Which sample each method of `cappy eval` picks for an example, the per-task and overall means
of the picks' Rouge-L (the methods are described in adapt.evaluate), and Cappy's comparisons with
other methods: per-example differences for the bootstrap (adapt.bootstrap) and per-task wins."""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from adapt.cache import SampleRecord
from service.upstream.best_of_n import argmax_first

METHODS = ("nucleus", "greedy", "self_scoring", "self_scoring_sum", "random", "oracle", "cappy")
METHOD_NAMES = {
    "nucleus": "Nucleus (1st sample)",
    "greedy": "Greedy",
    "self_scoring": "Self-scoring",
    "self_scoring_sum": "Self-scoring (sum)",
    "random": "Random",
    "oracle": "Oracle",
    "cappy": "Cappy",
}
SUBSET_SIZES = (1, 4, 17)
SUBSET_METHODS = ("cappy", "self_scoring", "self_scoring_sum")
OVERALL = "overall"
COMPARISONS = (("cappy", "self_scoring"), ("cappy", "greedy"), ("cappy", "self_scoring_sum"))
"""(A, B) pairs compared as A - B: the bootstrap and the per-task wins."""
TIE_WITHIN = 0.005
"""Per-task differences (Rouge-L x 100) smaller than this in size are ties: they round to 0.00 in
the report's tables."""


def sum_logprob(record: SampleRecord) -> float | None:
    """The sum of the sample's token log-probabilities (self-scoring's sum version, which favours
    short samples); None when unknown or no tokens, as `SampleRecord.mean_logprob`."""
    return sum(record.logprobs) if record.logprobs else None


def _first_index(records: Sequence[SampleRecord], names: set[str]) -> int | None:
    return next((i for i, r in enumerate(records) if r.decoding in names), None)


def subset_order(records: Sequence[SampleRecord], nucleus: set[str]) -> list[int]:
    """Sample indices, nucleus samples first, then the rest in recipe order."""
    first = [i for i, r in enumerate(records) if r.decoding in nucleus]
    return first + [i for i in range(len(records)) if i not in set(first)]


def _argmax(values: Sequence[float | None], among: Sequence[int]) -> int | None:
    """The index in `among` with the highest value (ties: the first); None when no value is
    known (no log-probabilities, no scores)."""
    if all(values[i] is None for i in among):
        return None
    keyed = [v if (v := values[i]) is not None else -math.inf for i in among]
    return among[argmax_first(keyed)]


def picks(
    records: Sequence[SampleRecord],
    rouge: Sequence[float],
    cappy: Sequence[float] | None,
    *,
    nucleus: set[str],
    greedy: set[str],
    rng: random.Random,
) -> dict[str, int | None]:
    """Each method's chosen sample index for one example (None: the method cannot choose)."""
    n = len(records)
    everything = list(range(n))
    logprobs = [r.mean_logprob for r in records]
    sums = [sum_logprob(r) for r in records]
    order = subset_order(records, nucleus)
    chosen: dict[str, int | None] = {
        "nucleus": _first_index(records, nucleus),
        "greedy": _first_index(records, greedy),
        "self_scoring": _argmax(logprobs, everything),
        "self_scoring_sum": _argmax(sums, everything),
        "random": rng.randrange(n),
        "oracle": _argmax(list(rouge), everything),
        "cappy": _argmax(list(cappy), everything) if cappy is not None else None,
    }
    for k in SUBSET_SIZES:
        # In recipe order, so that ties go to the first in recipe order, as the proxy breaks them.
        among = sorted(order[:k]) if k <= n else []
        chosen[f"self_scoring@{k}"] = _argmax(logprobs, among)
        chosen[f"self_scoring_sum@{k}"] = _argmax(sums, among)
        chosen[f"cappy@{k}"] = _argmax(list(cappy), among) if cappy is not None else None
    return chosen


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _by_task(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    return by_task


def aggregate(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """Per task and overall means (x 100) of each key's picked Rouge-L; None where a method
    could not choose for some example of the group."""
    by_task = _by_task(rows)
    result: dict[str, Any] = {}
    for key in keys:
        per_task: dict[str, float | None] = {}
        for task, task_rows in by_task.items():
            values = [r["picked_rouge"][key] for r in task_rows]
            per_task[task] = (
                None if any(v is None for v in values) else 100 * statistics.fmean(values)
            )
        task_means = list(per_task.values())
        every = [r["picked_rouge"][key] for r in rows]
        result[key] = {
            OVERALL: None
            if any(v is None for v in task_means)
            else _mean([v for v in task_means if v is not None]),
            "overall_examples": None
            if any(v is None for v in every)
            else 100 * statistics.fmean(every),
            "per_task": per_task,
        }
    return result


def paired_differences(
    rows: Sequence[dict[str, Any]], a: str, b: str
) -> dict[str, list[float]] | None:
    """Per task, each example's picked Rouge-L of key `a` minus key `b` (x 100); None when
    either could not choose for some example (no comparison on part of the examples)."""
    result: dict[str, list[float]] = {}
    for task, task_rows in _by_task(rows).items():
        values = [(r["picked_rouge"][a], r["picked_rouge"][b]) for r in task_rows]
        if any(x is None or y is None for x, y in values):
            return None
        result[task] = [100 * (x - y) for x, y in values]
    return result


def task_outcomes(
    a: dict[str, float | None], b: dict[str, float | None], tie_within: float = TIE_WITHIN
) -> dict[str, Any] | None:
    """A's per-task means against B's: wins (A higher by `tie_within` or more), losses, ties, and
    each task's difference A - B; None when either has no mean for some task."""
    differences: dict[str, float] = {}
    for task in sorted(a):
        x, y = a[task], b.get(task)
        if x is None or y is None:
            return None
        differences[task] = x - y
    return {
        "wins": sum(1 for d in differences.values() if d >= tie_within),
        "losses": sum(1 for d in differences.values() if d <= -tie_within),
        "ties": sum(1 for d in differences.values() if abs(d) < tie_within),
        "differences": differences,
    }
