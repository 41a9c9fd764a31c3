"""The held-out side of `cappy adapt train`: which examples it holds out, and what an evaluation
measures on them.

The split is by example: every pair of a held-out example (its ground truths, its mismatch, the
LLM's samples) is held out together, so no side of an example is seen in training. Each task
gives the same share of its examples (`fraction`, rounded, at least one where the task has two
or more), drawn with a seed.

What an evaluation reports, on the held-out pairs' scores:
- `mse`: the regression loss against the labels;
- `gt_accuracy`: how often an example's ground truth scores above its mismatch (each ground-truth
  pair against the example's mismatch, averaged per example, then over examples); a tie counts
  half, so a scorer that cannot tell them apart scores 0.5, chance (bf16 evaluation rounds close
  scores to equal ones);
- `selection_rouge`: for each example with two or more LLM samples, the Rouge-L label of the
  sample that scores highest (ties: the first), averaged per task and then over tasks, as the
  headline of `cappy eval` is; what the early stop watches when samples exist.
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from adapt.data import Pair
from adapt.errors import AdaptError
from service.upstream.best_of_n import argmax_first

# The metric the early stop watches, best first: the one the held-out pairs can measure.
METRICS = ("selection_rouge", "gt_accuracy", "mse")


@dataclass(frozen=True)
class Split:
    train: list[Pair]
    held_out: list[Pair]
    held_out_examples: int


def split_by_example(pairs: Sequence[Pair], fraction: float, seed: int) -> Split:
    """Holds out `fraction` of each task's examples with all their pairs.

    Raises:
        AdaptError: `fraction` outside [0, 1), or nothing left to train on.
    """
    if not 0 <= fraction < 1:
        raise AdaptError(f"--eval-fraction {fraction}: must be in [0, 1)")
    ids_by_task: dict[str, list[str]] = defaultdict(list)
    for pair in pairs:
        if pair.id not in ids_by_task[pair.task]:
            ids_by_task[pair.task].append(pair.id)
    rng = random.Random(seed)
    held: set[str] = set()
    for task in sorted(ids_by_task):
        ids = sorted(ids_by_task[task])
        count = round(len(ids) * fraction)
        if fraction > 0 and len(ids) >= 2:
            count = min(max(count, 1), len(ids) - 1)
        held.update(rng.sample(ids, count))
    train = [p for p in pairs if p.id not in held]
    if not train:
        raise AdaptError("--eval-fraction leaves no pairs to train on")
    return Split(
        train=train, held_out=[p for p in pairs if p.id in held], held_out_examples=len(held)
    )


def watched_metric(held_out: Sequence[Pair]) -> str | None:
    """The metric the early stop watches on these pairs: the selection Rouge-L where an example
    has two samples, else ground truth above mismatch where both exist, else the MSE; None with
    nothing held out."""
    if not held_out:
        return None
    samples: dict[str, int] = defaultdict(int)
    sources: dict[str, set[str]] = defaultdict(set)
    for pair in held_out:
        sources[pair.id].add(pair.source)
        if pair.source == "sample":
            samples[pair.id] += 1
    if any(count >= 2 for count in samples.values()):
        return "selection_rouge"
    if any({"ground_truth", "mismatch"} <= found for found in sources.values()):
        return "gt_accuracy"
    return "mse"


def metrics(pairs: Sequence[Pair], scores: Sequence[float]) -> dict[str, float]:
    """The held-out metrics of `scores` (one per pair, in order); a metric the pairs cannot
    measure is left out."""
    if len(pairs) != len(scores):
        raise ValueError(f"{len(pairs)} pairs but {len(scores)} scores")
    found: dict[str, float] = {
        "mse": statistics.fmean((s - p.label) ** 2 for p, s in zip(pairs, scores, strict=True))
    }
    by_example: dict[str, list[tuple[Pair, float]]] = defaultdict(list)
    for pair, score in zip(pairs, scores, strict=True):
        by_example[pair.id].append((pair, score))
    accuracies = []
    picks: dict[str, list[float]] = defaultdict(list)
    for scored in by_example.values():
        truths = [s for p, s in scored if p.source == "ground_truth"]
        wrong = [s for p, s in scored if p.source == "mismatch"]
        if truths and wrong:
            accuracies.append(
                statistics.fmean((t > w) + 0.5 * (t == w) for t in truths for w in wrong)
            )
        samples = [(p, s) for p, s in scored if p.source == "sample"]
        if len(samples) >= 2:
            best = argmax_first([s for _, s in samples])
            picks[samples[best][0].task].append(samples[best][0].label)
    if accuracies:
        found["gt_accuracy"] = statistics.fmean(accuracies)
    if picks:
        found["selection_rouge"] = statistics.fmean(statistics.fmean(v) for v in picks.values())
    return found
