"""parity.compare on synthetic scores: the relative fp32 gate, near-ties kept out of the argmax
gate, the tolerance that keeps that gate meaningful, and "not measured" when nothing is decided."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from model_export import parity


def _compare(
    reference: Sequence[Sequence[float]], got: Sequence[Sequence[float]], **gate: Any
) -> parity.ParityResult:
    """compare() with a `run` that returns the given scores for each set."""
    refs = [np.asarray(r, dtype=np.float32) for r in reference]
    encoded = [{"scores": np.asarray(g, dtype=np.float64)} for g in got]
    return parity.compare(refs, lambda feeds: feeds["scores"], encoded, provider="test", **gate)


FP32 = parity.GATES["fp32"]
FP16 = parity.GATES["fp16"]


def test_fp32_gate_is_relative_to_the_scores_scale() -> None:
    reference = [[30.0, 10.0, 20.0], [12.5, -40.0, 7.0]]
    got = [[30.002, 10.0, 20.0], [12.5, -40.0, 7.0]]  # |diff| 2e-3 <= 1e-4 * 40
    result = _compare(reference, got, **FP32)
    assert result.status == "passed", result.reason
    assert result.score_scale == 40.0
    assert result.max_abs_diff == pytest.approx(2e-3, rel=1e-3)
    assert result.max_rel_diff == pytest.approx(2e-3 / 40, rel=1e-3)
    assert result.threshold_max_abs_diff == pytest.approx(4e-3)
    assert result.threshold_max_rel_diff == parity.FP32_MAX_REL_DIFF
    assert result.argmax_agreement == 1.0 and result.decided_sets == 2


def test_the_same_error_fails_on_scores_below_one() -> None:
    # max(1, scale): scores in [0, 1] are held to 1e-4 absolute, never to less.
    result = _compare([[0.5, 0.1, 0.2]], [[0.5002, 0.1, 0.2]], **FP32)
    assert result.status == "failed"
    assert result.threshold_max_abs_diff == pytest.approx(1e-4)
    assert result.reason is not None
    assert result.reason.startswith("max |diff| 0.0002 > 0.0001 (= 0.0001 × max(1, max |score|")


def test_fp32_fails_when_the_best_candidate_changes() -> None:
    # Within the diff gate only because it is lenient here: the flip alone fails it.
    result = _compare([[2.0, 1.0]], [[2.0, 2.5]], **{**FP32, "max_rel_diff": 1.0})
    assert result.status == "failed"
    assert result.reason is not None and "argmax agreement 0.0000 < 1" in result.reason


def test_near_ties_are_reported_not_gated() -> None:
    reference = [
        [0.9, 0.1, 0.5],  # margin 0.4: decided, agrees
        [0.3001, 0.3, 0.1],  # margin 1e-4: a near-tie, flipped by an error of 2e-4
        [0.2, 0.2, 0.0],  # an exact tie: always a near-tie
    ]
    got = [[0.9002, 0.1, 0.5], [0.3, 0.3002, 0.1], [0.2, 0.2, 0.0]]
    result = _compare(reference, got, **FP16)
    assert result.status == "passed", result.reason
    assert (result.decided_sets, result.near_tie_sets) == (1, 2)
    assert result.argmax_agreement == 1.0
    assert result.near_tie_agreement == 0.5
    assert result.threshold_argmax_agreement == parity.REDUCED_ARGMAX_AGREEMENT


def test_a_flip_beyond_the_precisions_tolerance_fails() -> None:
    # Margin 0.3 against an error of 0.4: the set's own error would call it a near-tie, but an
    # fp16 graph may excuse at most 1e-2 x max(1, scale), so the set is decided and the flip counts.
    reference = [[1.0, 0.7, 0.0], [0.0, 0.5, 1.0]]
    got = [[0.6, 0.7, 0.0], [0.0, 0.5, 1.0]]
    result = _compare(reference, got, **FP16)
    assert result.status == "failed"
    assert (result.decided_sets, result.near_tie_sets) == (2, 0)
    assert result.argmax_agreement == 0.5
    assert result.reason == (
        "argmax agreement 0.5000 < 0.999 on 2 decided sets (0 near-ties not counted)"
    )
    # Without the tolerance, the rule would excuse the flip: it would be a near-tie.
    loose = _compare(reference, got, **{**FP16, "tie_tolerance": None})
    assert (loose.status, loose.decided_sets, loose.near_tie_sets) == ("passed", 1, 1)


def test_no_decided_set_is_not_measured() -> None:
    reference = [[0.5, 0.5, 0.1], [0.30001, 0.3, 0.2]]
    got = [[0.5, 0.5, 0.1], [0.3, 0.30001, 0.2]]
    result = _compare(reference, got, **FP16)
    assert result.status == "not_measured"
    assert result.argmax_agreement is None
    assert (result.decided_sets, result.near_tie_sets) == (0, 2)
    assert result.reason is not None and result.reason.startswith("no decided candidate set")


def test_fp32_without_decided_sets_still_rests_on_its_diff_gate() -> None:
    result = _compare([[0.5, 0.5]], [[0.5, 0.5]], **FP32)
    assert result.status == "passed"
    assert result.decided_sets == 0 and result.argmax_agreement is None


def test_single_candidate_sets_count_as_neither() -> None:
    result = _compare([[0.4], [0.9, 0.1]], [[0.4], [0.9, 0.1]], **FP16)
    assert (result.decided_sets, result.near_tie_sets, result.single_candidate_sets) == (1, 0, 1)
    assert result.candidate_sets == 2 and result.pairs == 3


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_scores_fail(bad: float) -> None:
    result = _compare([[3.0, 1.0]], [[bad, 1.0]], **FP32)
    assert result.status == "failed"
    assert result.max_abs_diff == math.inf


def test_a_wrong_shape_fails() -> None:
    result = _compare([[3.0, 1.0]], [[3.0]], **FP32)
    assert result.status == "failed" and result.max_abs_diff == math.inf


def test_absolute_gate_keeps_its_bound() -> None:
    """The OpenVINO int8 gate: an absolute bound, whatever the scale."""
    result = _compare([[40.0, 1.0]], [[40.06, 1.0]], max_abs_diff=0.05)
    assert result.status == "failed"
    assert result.threshold_max_abs_diff == 0.05
    assert result.reason is not None and result.reason.startswith("max |diff| 0.06 > 0.05")
    assert _compare([[40.0, 1.0]], [[40.04, 1.0]], max_abs_diff=0.05).status == "passed"


def test_the_record_holds_every_figure() -> None:
    record = _compare([[1.0, 0.0]], [[1.0, 0.0]], **FP16).as_dict()
    assert set(record) >= {
        "status",
        "max_abs_diff",
        "max_rel_diff",
        "score_scale",
        "argmax_agreement",
        "decided_sets",
        "near_tie_sets",
        "near_tie_agreement",
        "threshold_argmax_agreement",
        "tie_tolerance",
    }
