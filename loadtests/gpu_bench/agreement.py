"""Argmax agreement with the PyTorch fp32 reference, on the requests whose fp32 top-two margin
is not a near tie."""

from __future__ import annotations

import statistics
from typing import Any


def decisive_reference(
    scores: dict[str, list[float]], near_tie: float
) -> tuple[dict[str, int], dict[str, Any]]:
    """{id: fp32 argmax} of the requests with more than one candidate whose top-two margin is at
    least `near_tie` x the standard deviation of all reference scores, and a summary."""
    flat = [s for values in scores.values() for s in values]
    spread = statistics.pstdev(flat) if len(flat) > 1 else 0.0
    threshold = near_tie * spread
    decisive: dict[str, int] = {}
    single = ties = 0
    for key, values in scores.items():
        if len(values) < 2:
            single += 1
            continue
        order = sorted(range(len(values)), key=lambda i: (-values[i], i))
        if values[order[0]] - values[order[1]] < threshold:
            ties += 1
            continue
        decisive[key] = order[0]
    return decisive, {
        "requests": len(scores),
        "single_candidate": single,
        "near_ties": ties,
        "decisive": len(decisive),
        "score_std": round(spread, 6),
        "near_tie_threshold": round(threshold, 6),
    }


def score_agreement(
    scores: dict[str, list[float]],
    decisive: dict[str, int],
    reference: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """Argmax agreement of `scores` with the fp32 argmax on the decisive requests, and the
    largest absolute score difference from the reference over the requests both hold."""
    compared = agree = 0
    for key, index in decisive.items():
        values = scores.get(key)
        if not values:
            continue
        compared += 1
        agree += int(min(range(len(values)), key=lambda i: (-values[i], i)) == index)
    worst = None
    if reference:
        diffs = [
            abs(a - b)
            for key, ref in reference.items()
            if len(scores.get(key) or []) == len(ref)
            for a, b in zip(scores[key], ref, strict=True)
        ]
        worst = round(max(diffs), 6) if diffs else None
    return {
        "agreement": round(agree / compared, 5) if compared else None,
        "compared": compared,
        "max_abs_diff": worst,
    }
