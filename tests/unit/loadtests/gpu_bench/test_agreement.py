"""loadtests/gpu_bench/agreement.py: the near-tie filter and argmax agreement with fp32."""

from __future__ import annotations

import pytest

from loadtests.gpu_bench.agreement import decisive_reference, score_agreement


def test_near_ties_and_single_candidates_are_left_out_of_agreement() -> None:
    reference = {
        "a": [0.0, 1.0, 0.5],  # decisive: index 1
        "b": [2.0, 2.0001],  # near tie
        "c": [3.0],  # single candidate
        "d": [-1.0, -2.0],  # decisive: index 0
    }
    decisive, summary = decisive_reference(reference, near_tie=0.01)
    assert decisive == {"a": 1, "d": 0}
    assert summary["single_candidate"] == 1 and summary["near_ties"] == 1
    assert summary["decisive"] == 2 and summary["near_tie_threshold"] > 1e-4

    ours = {"a": [0.0, 0.9, 0.95], "b": [0.0, 1.0], "d": [-1.0, -2.0]}
    figures = score_agreement(ours, decisive, reference)
    assert figures["agreement"] == 0.5 and figures["compared"] == 2
    assert figures["max_abs_diff"] == pytest.approx(2.0)  # near ties count for the difference
    assert score_agreement({}, decisive)["agreement"] is None
