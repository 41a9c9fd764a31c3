"""Parity of an exported graph with the PyTorch model it came from.

A fixed, varied probe set (short, long, truncated at max_length, non-ASCII, empty responses),
grouped into candidate sets the way the service scores them: each set is one padded batch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FP32_MAX_ABS_DIFF = 1e-4
FP16_ARGMAX_AGREEMENT = 0.999

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


def probe_sets(seed: int = 1234) -> list[CandidateSet]:
    """16 candidate sets, 84 pairs; deterministic for a given seed."""
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
    sets.append(CandidateSet(words(700), ("yes", "no", words(30), words(800))))
    sets.append(CandidateSet("Answer briefly.", (words(900), "ok", words(3), words(600))))
    sets.append(CandidateSet(words(300) + " ?", (words(400), words(10), "")))
    sets.append(
        CandidateSet(
            "Pick the label: sports, politics, science.",
            ("sports", "politics", "science", "Sports", "science."),
        )
    )
    return sets


@dataclass(frozen=True)
class ParityResult:
    status: str  # "passed" | "failed" | "not_measured"
    provider: str | None
    pairs: int
    candidate_sets: int
    max_abs_diff: float | None
    argmax_agreement: float | None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def encode_set(tokenizer: Any, cset: CandidateSet, max_length: int) -> dict[str, np.ndarray]:
    """Tokenizes one candidate set as the contract says: instruction first, longest_first."""
    batch = tokenizer(
        [cset.instruction] * len(cset.candidates),
        list(cset.candidates),
        truncation="longest_first",
        max_length=max_length,
        padding=True,
        return_tensors="np",
    )
    return {name: np.asarray(value, dtype=np.int64) for name, value in batch.items()}


def reference_scores(
    model: Any, tokenizer: Any, sets: Sequence[CandidateSet], max_length: int
) -> list[np.ndarray]:
    """PyTorch fp32 scores (logits[:, 0]) per candidate set."""
    import torch

    out = []
    with torch.inference_mode():
        for cset in sets:
            feeds = encode_set(tokenizer, cset, max_length)
            tensors = {name: torch.from_numpy(value) for name, value in feeds.items()}
            out.append(model(**tensors).logits[:, 0].float().numpy())
    return out


def compare(
    reference: Sequence[np.ndarray],
    run: Callable[[dict[str, np.ndarray]], np.ndarray],
    encoded: Sequence[dict[str, np.ndarray]],
    *,
    provider: str,
    max_abs_diff: float | None = None,
    min_argmax_agreement: float | None = None,
) -> ParityResult:
    """Runs `run` on every encoded set and compares with `reference`; thresholds decide."""
    worst = 0.0
    agree = 0
    for ref, feeds in zip(reference, encoded, strict=True):
        got = np.asarray(run(feeds), dtype=np.float64).reshape(-1)
        worst = max(worst, float(np.max(np.abs(got - ref))))
        agree += int(np.argmax(got) == np.argmax(ref))
    agreement = agree / len(reference)
    failures = []
    if max_abs_diff is not None and not worst <= max_abs_diff:
        failures.append(f"max |diff| {worst:.3g} > {max_abs_diff:g}")
    if min_argmax_agreement is not None and agreement < min_argmax_agreement:
        failures.append(f"argmax agreement {agreement:.4f} < {min_argmax_agreement}")
    return ParityResult(
        status="failed" if failures else "passed",
        provider=provider,
        pairs=sum(len(ref) for ref in reference),
        candidate_sets=len(reference),
        max_abs_diff=worst,
        argmax_agreement=agreement,
        reason="; ".join(failures) or None,
    )


def not_measured(reason: str, sets: int, pairs: int) -> ParityResult:
    return ParityResult("not_measured", None, pairs, sets, None, None, reason)
