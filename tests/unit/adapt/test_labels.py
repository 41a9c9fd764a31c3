"""Rouge-L labels on hand-computed cases, and the mismatched reference: never the example's own."""

from __future__ import annotations

import random

import pytest

from adapt.examples import Example
from adapt.labels import RougeL, mismatch_reference


@pytest.fixture(scope="module")
def rouge() -> RougeL:
    return RougeL()


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        # LCS "the cat on the mat" = 5 of 6 tokens on both sides: P = R = F = 5/6.
        ("the cat sat on the mat", ["the cat is on the mat"], 5 / 6),
        # Stemming: "running dogs" -> "run dog".
        ("running dogs", ["run dog"], 1.0),
        # The best reference counts: "paris" vs "paris france" has P = 1, R = 1/2, F = 2/3.
        ("paris", ["london", "paris france"], 2 / 3),
        # Case and punctuation are dropped by rouge_score's tokenizer.
        ("Hello, World!", ["hello world"], 1.0),
        # LCS 2 ("a c") of 3 predicted and 4 reference tokens: F = 2 * (2/3 * 1/2) / (2/3 + 1/2).
        ("a b c", ["a c d e"], 2 * (2 / 3 * 1 / 2) / (2 / 3 + 1 / 2)),
        ("", ["anything"], 0.0),
        ("no overlap here", ["completely different words"], 0.0),
        # The known limit: only [a-z0-9] survive tokenization, so other scripts score 0.
        ("机器学习", ["机器学习"], 0.0),
    ],
)
def test_rouge_l_hand_computed(
    rouge: RougeL, prediction: str, references: list[str], expected: float
) -> None:
    assert rouge(prediction, references) == pytest.approx(expected)


def _task(name: str, targets: list[list[str]]) -> list[Example]:
    return [
        Example(f"{name}-{i}", f"{name} question {i}", tuple(t), name)
        for i, t in enumerate(targets)
    ]


def test_mismatch_is_never_the_examples_own_reference() -> None:
    examples = _task("t", [["red", "crimson"], ["blue"], ["green", "red"], ["yellow"]])
    seen: set[str] = set()
    for seed in range(200):
        rng = random.Random(seed)
        for example in examples:
            wrong = mismatch_reference(example, examples, rng)
            assert wrong is not None
            assert wrong not in example.targets
            assert any(wrong in other.targets for other in examples if other.id != example.id)
            seen.add(wrong)
    # Every other reference gets drawn at some point: the draw is not stuck on one.
    assert seen == {"red", "crimson", "blue", "green", "yellow"}


def test_mismatch_skips_references_equal_to_the_examples_own() -> None:
    # Short-answer tasks repeat answers: another example's "Yes" is no wrong answer to "yes".
    examples = _task("yn", [["yes"], [" Yes "], ["yes", "no"]])
    rng = random.Random(0)
    assert mismatch_reference(examples[0], examples, rng) == "no"
    assert mismatch_reference(examples[1], examples, rng) == "no"
    assert mismatch_reference(examples[2], examples, rng) is None


def test_no_mismatch_for_a_task_with_one_example() -> None:
    alone = _task("alone", [["only"]])
    assert mismatch_reference(alone[0], alone, random.Random(0)) is None


def test_mismatch_stays_within_the_pool_it_is_given() -> None:
    a = _task("a", [["a0"], ["a1"]])
    b = _task("b", [["b0"], ["b1"]])
    for seed in range(50):
        assert mismatch_reference(a[0], a, random.Random(seed)) == "a1"
        assert mismatch_reference(b[1], b, random.Random(seed)) == "b0"
