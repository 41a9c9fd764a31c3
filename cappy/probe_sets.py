"""The probe sets: fixed, varied candidate sets of real words (short, long, truncated at any
max_length, non-ASCII, empty responses), deterministic for a seed. The export's parity gates on
them (model_export.parity), and the service calibrates its re-scoring margin on them at warm-up
(service.engine.warmup.text_batches): text the model reads the way it reads requests, where the
synthetic warm-up ids are not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_WORDS = (
    "the model answers a question about rivers mountains history code music physics recipes "
    "travel languages because therefore however carefully quickly seven hundred numbers list "
    "summary explain translate compare write poem story function python return value error"
).split()

_INSTRUCTIONS = (
    "What is the capital of France?",
    "Translate to German: The weather is nice today.",
    "Write a haiku about autumn leaves.",
    "Is the following review positive or negative? 'I loved every minute of it.'",
    "Summarize: The committee met on Tuesday and agreed to postpone the vote until spring.",
    "Solve: 17 + 25 = ?",
    "请用一句话解释什么是机器学习。",
    "Réponds en français : quelle est la couleur du ciel ?",
    "Which planet is known as the Red Planet? Options: Mars, Venus, Jupiter, Saturn.",
    "Write a Python function that returns the square of a number.",
    "",
    "Explain why the sky is blue to a five-year-old 🌤️.",
)


@dataclass(frozen=True)
class CandidateSet:
    instruction: str
    candidates: tuple[str, ...]
    # Longer than any max_length: a set built to be cut by truncation.
    cut: bool = False


def probe_sets(seed: int = 1234) -> list[CandidateSet]:
    """16 candidate sets, 76 pairs; deterministic for a given seed."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(n))

    sets: list[CandidateSet] = []
    for instruction in _INSTRUCTIONS:
        candidates = [
            words(rng.randint(1, 4)),  # short
            words(rng.randint(15, 40)),  # medium
            "",  # empty response
            "Ünïcödé ñ 中文回答 ✓ — " + words(5),  # non-ASCII
            words(rng.randint(60, 120)),  # long
        ]
        rng.shuffle(candidates)
        sets.append(CandidateSet(instruction, tuple(candidates)))
    # Longer than any max_length: truncation (longest_first) on both sides or one side.
    sets.append(CandidateSet(words(700), ("yes", "no", words(30), words(800)), cut=True))
    sets.append(CandidateSet("Answer briefly.", (words(900), "ok", words(3), words(600)), cut=True))
    sets.append(CandidateSet(words(300) + " ?", (words(400), words(10), ""), cut=True))
    sets.append(
        CandidateSet(
            "Pick the label: sports, politics, science.",
            ("sports", "politics", "science", "Sports", "science."),
        )
    )
    return sets
