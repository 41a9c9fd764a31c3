"""loadtests/stats.py: percentiles as numpy computes them, histogram quantiles as Prometheus."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtests.stats import histogram_quantile, percentile


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = [float(v) for v in np.random.default_rng(7).exponential(30.0, size=101)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edge_cases() -> None:
    assert percentile([], 50) is None
    assert percentile([4.0], 99) == 4.0
    assert percentile([1.0, 2.0], 50) == 1.5
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.01, 10.0), (0.1, 110.0), (math.inf, 110.0)]
    # rank 55 of 110: 45 into the 100 of the (0.01, 0.1] bucket.
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01 + 0.09 * 45 / 100)
    assert histogram_quantile(0.05, buckets) == pytest.approx(0.01 * 5.5 / 10)
    # Falls in +Inf: the largest finite bound.
    assert histogram_quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == 0.1
    assert histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.5, []) is None
