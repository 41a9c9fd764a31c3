"""Parity of an exported graph with the PyTorch model it came from, on the probe sets: the
measurement, and the gates that decide whether a graph may be shipped.

The probe sets (cappy/probe_sets.py: short, long, truncated at max_length, non-ASCII, empty
responses), grouped into candidate sets the way the service scores them: each set is one padded
batch.

What is measured, per candidate set i (reference r = PyTorch fp32 scores, g = the graph's):
  err_i    = max_j |g_j - r_j|                     the set's error (inf if g is not finite)
  margin_i = best - second best of r               the reference's margin (sets of one candidate
                                                   have none: they count as neither kind below)
  scale    = max |r| over every set                the scores' scale
and over all sets max_abs_diff = max_i err_i, max_rel_diff = max_abs_diff / max(1, scale).

Near-ties. A set is *decided* when margin_i > 2 × min(err_i, tie_tolerance × max(1, scale)),
otherwise it is a *near-tie*. The factor 2: best and second can move in opposite directions,
each by up to err_i, so a margin wider than 2 × err_i cannot be reversed by this graph's error.
argmax agreement is gated on decided sets only; near-ties are counted and their agreement is
reported, never gated. The cap tie_tolerance (relative to the scale, per precision) is what keeps
the gate meaningful: with the set's own error alone, a set whose margin exceeds 2 × err_i can never
change its argmax, so the gate would pass by construction and a graph with a large error would
only turn every set into a near-tie. With the cap, an error up to the tolerance expected of that
precision excuses a near-tie; a larger one does not, and the argmax flips it causes fail the gate.

Gates (`compare`'s keyword thresholds; the pipeline's per-variant choice is in `GATES`):
  max_rel_diff          max_abs_diff <= max_rel_diff × max(1, scale): fp32, whose rounding
                        through many layers grows with the scores' magnitude;
  max_abs_diff          an absolute bound (the OpenVINO int8 gate: its re-scoring margin);
  min_argmax_agreement  agreement on decided sets. When it is the only criterion and no set is
                        decided, the status is "not_measured" (nothing was shown), not "passed".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import numpy as np

from cappy.probe_sets import CandidateSet

# fp32: max |diff| <= 1e-4 × max(1, max |reference score|). fp32 rounding through 24 layers is
# ~2e-5 relative (a BERT-large stand-in scoring 3.8..10.4 differed by 1.7e-4 absolute).
FP32_MAX_REL_DIFF = 1e-4
# Reduced precisions: the same best candidate on at least this share of the decided sets.
REDUCED_ARGMAX_AGREEMENT = 0.999
# The error, relative to max(1, scale), that may excuse a near-tie, per precision: fp32 its own
# gate; fp16 (10-bit mantissa, ~5e-4 per rounding) a few roundings through the network;
# dynamic int8 (weights quantised per tensor) an order of magnitude more.
TIE_TOLERANCE = {"fp32": FP32_MAX_REL_DIFF, "fp16": 1e-2, "int8": 1e-1}


class Gates(TypedDict, total=False):
    """`judge`'s thresholds (the module docstring's "Gates"); a missing one is not applied."""

    max_abs_diff: float | None
    max_rel_diff: float | None
    min_argmax_agreement: float | None
    tie_tolerance: float | None


GATES: dict[str, Gates] = {
    "fp32": {
        "max_rel_diff": FP32_MAX_REL_DIFF,
        "min_argmax_agreement": 1.0,
        "tie_tolerance": TIE_TOLERANCE["fp32"],
    },
    "fp16": {
        "min_argmax_agreement": REDUCED_ARGMAX_AGREEMENT,
        "tie_tolerance": TIE_TOLERANCE["fp16"],
    },
    "int8": {
        "min_argmax_agreement": REDUCED_ARGMAX_AGREEMENT,
        "tie_tolerance": TIE_TOLERANCE["int8"],
    },
}


@dataclass(frozen=True)
class ParityResult:
    """One variant's figures and verdict; `as_dict` is its record in the manifest.

    Thresholds are the ones actually applied (None: not part of this gate);
    threshold_max_abs_diff is the absolute bound the diff was held to (for fp32, the relative
    tolerance times max(1, score_scale))."""

    status: str  # "passed" | "failed" | "not_measured"
    provider: str | None
    pairs: int
    candidate_sets: int
    max_abs_diff: float | None
    argmax_agreement: float | None  # on decided sets
    reason: str | None = None
    score_scale: float | None = None
    max_rel_diff: float | None = None
    decided_sets: int | None = None
    near_tie_sets: int | None = None
    near_tie_agreement: float | None = None
    single_candidate_sets: int | None = None
    threshold_max_abs_diff: float | None = None
    threshold_max_rel_diff: float | None = None
    threshold_argmax_agreement: float | None = None
    tie_tolerance: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SetFigures:
    """What one candidate set measured (see the module docstring)."""

    error: float
    margin: float | None  # None: a single candidate
    agrees: bool


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


def measure_set(ref: np.ndarray, got: np.ndarray) -> SetFigures:
    """One set's error, reference margin and argmax agreement (ties: the lower index)."""
    ref = np.asarray(ref, dtype=np.float64).reshape(-1)
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    if got.shape != ref.shape or not np.all(np.isfinite(got)):
        # A wrong shape or a NaN/inf is an unbounded error (and np.max would hide a NaN).
        return SetFigures(math.inf, _margin(ref), False)
    error = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    agrees = bool(ref.size == 0 or np.argmax(got) == np.argmax(ref))
    return SetFigures(error, _margin(ref), agrees)


def _margin(ref: np.ndarray) -> float | None:
    if ref.size < 2:
        return None
    top, second = np.sort(ref)[-2:][::-1]
    return float(top - second)


def compare(
    reference: Sequence[np.ndarray],
    run: Callable[[dict[str, np.ndarray]], np.ndarray],
    encoded: Sequence[dict[str, np.ndarray]],
    *,
    provider: str,
    **gates: Unpack[Gates],
) -> ParityResult:
    """Runs `run` on every encoded set, compares with `reference`, applies the given gates."""
    figures = [measure_set(ref, run(feeds)) for ref, feeds in zip(reference, encoded, strict=True)]
    return judge(reference, figures, provider=provider, **gates)


def judge(
    reference: Sequence[np.ndarray],
    figures: Sequence[SetFigures],
    *,
    provider: str,
    max_abs_diff: float | None = None,
    max_rel_diff: float | None = None,
    min_argmax_agreement: float | None = None,
    tie_tolerance: float | None = None,
) -> ParityResult:
    """The figures of every set, summed up and held to the gates (module docstring)."""
    scale = max((float(np.max(np.abs(r))) for r in reference if np.size(r)), default=0.0)
    unit = max(1.0, scale)
    worst = max((f.error for f in figures), default=0.0)
    cap = math.inf if tie_tolerance is None else tie_tolerance * unit
    ranked = [f for f in figures if f.margin is not None]
    decided = [f for f in ranked if _decided(f, cap)]
    ties = [f for f in ranked if not _decided(f, cap)]
    agreement = _share(decided)
    abs_threshold = max_abs_diff
    if max_rel_diff is not None:
        rel_bound = max_rel_diff * unit
        abs_threshold = rel_bound if abs_threshold is None else min(abs_threshold, rel_bound)

    failures = []
    if abs_threshold is not None and not worst <= abs_threshold:
        failures.append(_diff_failure(worst, abs_threshold, max_abs_diff, max_rel_diff, scale))
    if min_argmax_agreement is not None and agreement is not None:
        if agreement < min_argmax_agreement:
            failures.append(
                f"argmax agreement {agreement:.4f} < {min_argmax_agreement:g} on "
                f"{len(decided)} decided sets ({len(ties)} near-ties not counted)"
            )
    status = "failed" if failures else "passed"
    reason = "; ".join(failures) or None
    if not failures and min_argmax_agreement is not None and not decided:
        reason = (
            f"no decided candidate set: all {len(ties)} sets with two or more candidates are "
            "near-ties (fp32 margin best - second <= 2 × error), so argmax agreement says nothing"
        )
        if abs_threshold is None:  # argmax was the only criterion: nothing was shown
            status = "not_measured"
    return ParityResult(
        status=status,
        provider=provider,
        pairs=sum(int(np.size(r)) for r in reference),
        candidate_sets=len(figures),
        max_abs_diff=worst,
        argmax_agreement=agreement,
        reason=reason,
        score_scale=scale,
        max_rel_diff=worst / unit,
        decided_sets=len(decided),
        near_tie_sets=len(ties),
        near_tie_agreement=_share(ties),
        single_candidate_sets=sum(1 for f in figures if f.margin is None),
        threshold_max_abs_diff=abs_threshold,
        threshold_max_rel_diff=max_rel_diff,
        threshold_argmax_agreement=min_argmax_agreement,
        tie_tolerance=tie_tolerance,
    )


def _decided(figures: SetFigures, cap: float) -> bool:
    """The reference margin exceeds twice the error that may excuse a flip (module docstring)."""
    return figures.margin is not None and figures.margin > 2 * min(figures.error, cap)


def _share(figures: Sequence[SetFigures]) -> float | None:
    return sum(f.agrees for f in figures) / len(figures) if figures else None


def _diff_failure(
    worst: float,
    threshold: float,
    max_abs_diff: float | None,
    max_rel_diff: float | None,
    scale: float,
) -> str:
    if max_abs_diff is not None and threshold == max_abs_diff:
        return f"max |diff| {worst:.3g} > {max_abs_diff:g}"
    return (
        f"max |diff| {worst:.3g} > {threshold:.3g} "
        f"(= {max_rel_diff:g} × max(1, max |score| {scale:.3g}))"
    )


def not_measured(reason: str, sets: int, pairs: int) -> ParityResult:
    return ParityResult("not_measured", None, pairs, sets, None, None, reason)
