"""Labels of the regression data (paper §3.4): Rouge-L F of a response against an example's
references, and the mismatched reference that pairs an instruction with a wrong answer.

Rouge-L is Google's `rouge_score` with `use_stemmer=True`, as the paper's code computes it, taking
the maximum F-measure over the references. Its tokenizer keeps only `[a-z0-9]` runs (lower-cased),
so text in other scripts (Hindi, Chinese, IPA symbols) scores 0 against anything: a known limit of
the metric that the paper's numbers share, not something fixed here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from rouge_score import rouge_scorer

from adapt.examples import Example


class RougeL:
    """`rouge(prediction, references)` -> the best Rouge-L F1 over the references, in [0, 1]."""

    def __init__(self) -> None:
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def __call__(self, prediction: str, references: Sequence[str]) -> float:
        best = 0.0
        for reference in references:
            # rouge_score's argument order is (target, prediction).
            score = self._scorer.score(reference, prediction)["rougeL"].fmeasure
            best = max(best, float(score))
        return best


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def mismatch_reference(
    example: Example, same_task: Sequence[Example], rng: random.Random
) -> str | None:
    """A reference of another example of the same task, to pair with `example` as a 0.0 label.

    Never one of the example's own references: other examples are those with another id, and a
    reference that equals one of `example`'s own (after whitespace and case folding; short-answer
    tasks repeat answers such as "yes") is not a wrong answer, so it is never drawn either.

    Returns:
        The reference, or None when the task has no other example (or no other reference that
        differs from the example's own).
    """
    own = {_normalised(t) for t in example.targets}
    candidates = sorted(
        {
            target
            for other in same_task
            if other.id != example.id
            for target in other.targets
            if _normalised(target) not in own and target.strip()
        }
    )
    if not candidates:
        return None
    return rng.choice(candidates)
