"""The paired, task-stratified bootstrap of `cappy eval`: how sure is a difference between two
selection methods' overall Rouge-L.

The statistic is the headline's: "overall" is the mean over tasks of each task's mean over its
examples. One resample draws, within every task, as many examples as the task has, with
replacement, and recomputes that mean of task means; tasks thus keep the equal weight they have in
the headline (an unstratified bootstrap would weigh them by their resampled sizes). The bootstrap
is paired: it resamples the per-example differences A - B, so both methods are judged on the same
resampled examples. The interval is the percentile interval of the resampled statistics.

Resamples are drawn task by task in sorted task order from one seeded generator, so that two
comparisons over the same tasks and sizes with the same seed use the same resampled examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
METHOD = "paired bootstrap, stratified by task, percentile interval"


@dataclass(frozen=True, slots=True)
class Interval:
    """A bootstrapped difference A - B.

    Attributes:
        difference: the observed difference (mean over tasks of the task means).
        low: the interval's lower end (the (1 - level) / 2 quantile of the resamples).
        high: its upper end (the (1 + level) / 2 quantile).
        share_above_zero: the share of resamples whose difference is > 0.
        examples: examples resampled (all tasks).
        tasks: tasks (strata).
    """

    difference: float
    low: float
    high: float
    share_above_zero: float
    examples: int
    tasks: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(
    differences: Mapping[str, Sequence[float]],
    *,
    seed: int,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
) -> Interval:
    """Bootstraps the mean over tasks of the task means of per-example differences (A - B).

    Args:
        differences: per task, each example's difference A - B (in the unit to report).
        seed: the generator's seed.
        resamples: bootstrap resamples.
        level: the interval's coverage, e.g. 0.95.

    Raises:
        ValueError: no tasks, a task without examples, resamples below 1, or level outside (0, 1).
    """
    if not differences or any(len(v) == 0 for v in differences.values()):
        raise ValueError("the bootstrap needs at least one example in every task")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"resamples must be >= 1 and level in (0, 1), got {resamples}, {level}")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    observed = 0.0
    for task in sorted(differences):
        values = np.asarray(differences[task], dtype=float)
        observed += float(values.mean())
        # One draw of (resamples x task size) indices per task: vectorised, and memory bounded
        # by the largest task rather than by the whole evaluation.
        picks = rng.integers(0, len(values), size=(resamples, len(values)))
        total += values[picks].mean(axis=1)
    tasks = len(differences)
    statistics = total / tasks
    low, high = np.quantile(statistics, [(1 - level) / 2, (1 + level) / 2])
    return Interval(
        difference=observed / tasks,
        low=float(low),
        high=float(high),
        share_above_zero=float(np.mean(statistics > 0)),
        examples=sum(len(v) for v in differences.values()),
        tasks=tasks,
    )
