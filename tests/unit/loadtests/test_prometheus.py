"""loadtests/prometheus.py: the /metrics parser and the difference of two scrapes."""

from __future__ import annotations

import pytest

from loadtests.prometheus import metrics_diff, parse_metrics, queue_time

# Two /metrics scrapes of one server, an interval apart: the same series, other counts.
METRICS = """\
# HELP cappy_batch_size Pairs per model batch.
# TYPE cappy_batch_size histogram
cappy_batch_size_bucket{{le="1.0"}} 2.0
cappy_batch_size_bucket{{le="+Inf"}} {batches}
cappy_batch_size_sum {pairs}
cappy_batch_size_count {batches}
cappy_batch_tokens_sum {tokens}
cappy_batch_tokens_count {batches}
cappy_batch_padding_fraction_sum {padding}
cappy_batch_padding_fraction_count {batches}
cappy_queue_time_seconds_bucket{{le="0.001"}} 0.0
cappy_queue_time_seconds_bucket{{le="0.01"}} 10.0
cappy_queue_time_seconds_bucket{{le="0.1"}} {queued}
cappy_queue_time_seconds_bucket{{le="+Inf"}} {queued}
cappy_queue_time_seconds_sum {queue_s}
cappy_queue_time_seconds_count {queued}
cappy_requests_rejected_total{{reason="overloaded"}} {overloaded}
cappy_request_duration_seconds_count{{route="/select",status="200"}} {requests}
{more}"""
# (before, after) of each count in METRICS.
SCRAPES = {
    "batches": (4.0, 14.0),
    "pairs": (20.0, 340.0),
    "tokens": (1000.0, 11000.0),
    "padding": (0.4, 2.4),
    "queued": (20.0, 120.0),
    "queue_s": (0.5, 5.5),
    "overloaded": (1.0, 4.0),
    "requests": (4.0, 14.0),
    "more": (
        "",
        'cappy_requests_rejected_total{reason="deadline"} 2.0\n'
        'cappy_pairs_dropped_total{reason="cancelled"} 0.0\n',
    ),
}
METRICS_BEFORE, METRICS_AFTER = (
    METRICS.format(**{key: values[i] for key, values in SCRAPES.items()}) for i in (0, 1)
)


def test_parse_metrics_reads_names_labels_and_values() -> None:
    text = (
        "# HELP x help\n# TYPE x counter\n"
        'cappy_requests_rejected_total{reason="overloaded"} 3.0\n'
        'odd_total{path="/a,b}c",quote="say \\"hi\\""} 2 1700000000000\n'
        'cappy_batch_size_bucket{le="+Inf"} 7.0\n'
        "plain_gauge 1.5e3\n"
        "\n"
    )
    samples = parse_metrics(text)
    assert samples[("cappy_requests_rejected_total", frozenset({("reason", "overloaded")}))] == 3
    assert samples[("odd_total", frozenset({("path", "/a,b}c"), ("quote", 'say "hi"')}))] == 2
    assert samples[("cappy_batch_size_bucket", frozenset({("le", "+Inf")}))] == 7
    assert samples[("plain_gauge", frozenset())] == 1500


def test_parse_metrics_reads_the_real_registry() -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    registry = CollectorRegistry()
    histogram = Histogram("cappy_batch_size", "x", buckets=(1, 8, 64), registry=registry)
    counter = Counter("cappy_requests_rejected_total", "x", ["reason"], registry=registry)
    for size in (1, 8, 40):
        histogram.observe(size)
    counter.labels(reason="overloaded").inc(2)
    samples = parse_metrics(generate_latest(registry).decode())
    assert samples[("cappy_batch_size_count", frozenset())] == 3
    assert samples[("cappy_batch_size_sum", frozenset())] == 49
    assert samples[("cappy_batch_size_bucket", frozenset({("le", "8.0")}))] == 2
    assert samples[("cappy_requests_rejected_total", frozenset({("reason", "overloaded")}))] == 2


def test_metrics_diff_reports_the_interval_only() -> None:
    before = parse_metrics(METRICS_BEFORE)
    after = parse_metrics(METRICS_AFTER)
    figures = metrics_diff(before, after)
    assert figures["batches"] == 10
    assert figures["mean_batch_size"] == 32.0  # (340 - 20) / 10
    assert figures["mean_batch_tokens"] == 1000.0
    assert figures["mean_padding_fraction"] == 0.2
    assert figures["queue_time_mean_ms"] == 50.0  # 5.0 s over 100 pairs
    # All 100 new observations sit in (0.01, 0.1]: the median is halfway through it.
    assert figures["queue_time_p50_ms_est"] == pytest.approx(55.0)
    assert figures["rejected"] == {"overloaded": 3, "deadline": 2}
    assert figures["pairs_dropped"] == {}


def test_metrics_diff_of_an_idle_server_and_of_a_restart() -> None:
    same = parse_metrics(METRICS_AFTER)
    idle = metrics_diff(same, same)
    assert idle["batches"] == 0 and idle["mean_batch_size"] is None
    assert idle["queue_time_p50_ms_est"] is None
    restarted = metrics_diff(same, parse_metrics(METRICS_BEFORE))
    assert "error" in restarted


def _queue_histogram(counts: dict[str, float]) -> dict:
    text = "\n".join(
        f'cappy_queue_time_seconds_bucket{{le="{le}"}} {count}' for le, count in counts.items()
    )
    return parse_metrics(text + "\n")


def test_queue_time_of_the_interval_against_the_limit() -> None:
    before = _queue_histogram({"5.0": 10, "10.0": 10, "20.0": 10, "+Inf": 10})
    # 100 pairs in the interval: 60 under 5 s, 20 in 5-10 s, 20 in 10-20 s
    after = _queue_histogram({"5.0": 70, "10.0": 90, "20.0": 110, "+Inf": 110})
    figures = queue_time(before, after, limit_s=10.0)
    assert figures["pairs"] == 100 and figures["over_limit_share"] == 0.2
    assert figures["p50_s"] == pytest.approx(5.0 * 50 / 60, abs=1e-3)
    assert figures["p99_s"] == pytest.approx(10.0 + 10.0 * 19 / 20, abs=1e-3)
    halfway = queue_time(before, after, limit_s=7.5)  # inside a bucket: linear
    assert halfway["over_limit_share"] == 0.3
    assert queue_time(before, before, limit_s=10.0)["over_limit_share"] is None
