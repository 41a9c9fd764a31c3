"""The server's /metrics: Prometheus text exposition parsed into samples, and two scrapes
differenced into the figures of the interval between them."""

from __future__ import annotations

from typing import Any

from loadtests.stats import histogram_quantile, round_or_none

Sample = tuple[str, frozenset[tuple[str, str]]]


def parse_metrics(text: str) -> dict[Sample, float]:
    """Prometheus text exposition -> {(sample name, labels): value}. Comments, blank lines and
    timestamps are ignored."""
    samples: dict[Sample, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        labels: frozenset[tuple[str, str]] = frozenset()
        if "{" in line:
            name, rest = line.split("{", 1)
            label_text, _, value_text = _split_labels(rest)
            labels = frozenset(_parse_labels(label_text).items())
        else:
            name, _, value_text = line.partition(" ")
        value_text = value_text.strip().split(" ")[0]
        try:
            value = float(value_text)
        except ValueError:
            continue
        samples[(name.strip(), labels)] = value
    return samples


def _split_labels(rest: str) -> tuple[str, str, str]:
    """Splits `a="x",b="y"} 1.0` at the closing brace, honouring quoted strings."""
    quoted = escaped = False
    for i, char in enumerate(rest):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "}" and not quoted:
            return rest[:i], "}", rest[i + 1 :]
    raise ValueError(f"unterminated label set: {rest!r}")


def _parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in ", ":
            i += 1
        if i >= n:
            break
        eq = text.index("=", i)
        key = text[i:eq].strip()
        i = eq + 1
        if text[i] != '"':
            raise ValueError(f"label value not quoted: {text!r}")
        i += 1
        value: list[str] = []
        while text[i] != '"':
            if text[i] == "\\":
                i += 1
                value.append({"n": "\n", "\\": "\\", '"': '"'}.get(text[i], text[i]))
            else:
                value.append(text[i])
            i += 1
        labels[key] = "".join(value)
        i += 1
    return labels


def _total(samples: dict[Sample, float], name: str, **match: str) -> float:
    """Sum of the samples called `name` whose labels include `match`."""
    wanted = set(match.items())
    return sum(v for (n, labels), v in samples.items() if n == name and wanted <= labels)


def _buckets(samples: dict[Sample, float], name: str) -> list[tuple[float, float]]:
    """Cumulative (le, count) of histogram `name` (summed over its other labels), by bound."""
    by_bound: dict[float, float] = {}
    for (n, labels), value in samples.items():
        if n != f"{name}_bucket":
            continue
        le = dict(labels).get("le")
        if le is None:
            continue
        bound = float(le)
        by_bound[bound] = by_bound.get(bound, 0.0) + value
    return sorted(by_bound.items())


def _by_label(samples: dict[Sample, float], name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), value in samples.items():
        if n == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + value
    return out


def _difference(before: dict[Sample, float], after: dict[Sample, float]) -> dict[Sample, float]:
    """Each sample's change between two scrapes (a sample missing from one counts as 0)."""
    return {key: after.get(key, 0.0) - before.get(key, 0.0) for key in set(before) | set(after)}


def metrics_diff(before: dict[Sample, float], after: dict[Sample, float]) -> dict[str, Any]:
    """Server-side figures for the interval between two /metrics scrapes (counters and histograms
    differenced; a restarted server shows up as negative counts and yields an error entry)."""
    diff = _difference(before, after)

    def mean(name: str) -> float | None:
        count = _total(diff, f"{name}_count")
        return _total(diff, f"{name}_sum") / count if count > 0 else None

    def quantile_ms(name: str, q: float) -> float | None:
        value = histogram_quantile(q, _buckets(diff, name))
        return None if value is None else value * 1000

    batches = _total(diff, "cappy_batch_size_count")
    if batches < 0:
        return {"error": "the server's counters went down between scrapes (restarted?)"}
    queue_mean = mean("cappy_queue_time_seconds")
    inference_mean = mean("cappy_inference_time_seconds")
    rejected = {
        k: int(v)
        for k, v in _by_label(diff, "cappy_requests_rejected_total", "reason").items()
        if v
    }
    dropped = {
        k: int(v) for k, v in _by_label(diff, "cappy_pairs_dropped_total", "reason").items() if v
    }
    cpu_s = _total(diff, "process_cpu_seconds_total")
    pairs = _total(diff, "cappy_pairs_scored_total")
    return {
        "batches": int(batches),
        "mean_batch_size": round_or_none(mean("cappy_batch_size"), 2),
        "mean_batch_tokens": round_or_none(mean("cappy_batch_tokens"), 1),
        "mean_padding_fraction": round_or_none(mean("cappy_batch_padding_fraction"), 4),
        "pairs_scored": int(_total(diff, "cappy_pairs_scored_total")),
        "tokens_scored": int(_total(diff, "cappy_tokens_scored_total")),
        "pairs_truncated": int(_total(diff, "cappy_pairs_truncated_total")),
        "queue_time_mean_ms": round_or_none(None if queue_mean is None else queue_mean * 1000, 2),
        "queue_time_p50_ms_est": round_or_none(quantile_ms("cappy_queue_time_seconds", 0.5), 2),
        "queue_time_p95_ms_est": round_or_none(quantile_ms("cappy_queue_time_seconds", 0.95), 2),
        "inference_time_mean_ms": round_or_none(
            None if inference_mean is None else inference_mean * 1000, 2
        ),
        "inference_busy_s": round_or_none(_total(diff, "cappy_inference_time_seconds_sum"), 3),
        "tokenize_time_mean_ms": round_or_none(
            None if (m := mean("cappy_tokenize_time_seconds")) is None else m * 1000, 2
        ),
        "rejected": rejected,
        "pairs_dropped": dropped,
        # CPU the server process used (all threads), and pairs per CPU-second: less moved by
        # other tenants of a shared host than wall-clock rates.
        "cpu_s": round_or_none(cpu_s, 2) if cpu_s else None,
        "pairs_per_cpu_s": round_or_none(pairs / cpu_s, 1) if cpu_s else None,
        # Near-tied leaders re-scored for ranking, by the precision that re-scored them (pairs
        # re-scored in bf16 by the batcher are in pairs_scored and the batch figures too).
        "pairs_rescored": {
            k: int(v)
            for k, v in _by_label(diff, "cappy_pairs_rescored_total", "precision").items()
            if v
        },
    }


def queue_time(
    before: dict[Sample, float], after: dict[Sample, float], limit_s: float | None
) -> dict[str, Any]:
    """The server's queue time of the pairs that started a batch between two scrapes: their
    count, p50 and p99 (interpolated in the histogram's buckets) and the share that waited over
    `limit_s` (the queue-wait limit; exact when it is a bucket bound, as the 10 s default is)."""
    name = "cappy_queue_time_seconds"
    diff = _difference(before, after)
    buckets = _buckets(diff, name)
    pairs = buckets[-1][1] if buckets else 0.0
    over = None
    if limit_s is not None and pairs > 0:
        under = histogram_quantile_rank(limit_s, buckets)
        over = round((pairs - under) / pairs, 4)
    return {
        "pairs": int(pairs),
        "p50_s": round_or_none(histogram_quantile(0.5, buckets), 3),
        "p99_s": round_or_none(histogram_quantile(0.99, buckets), 3),
        "limit_s": limit_s,
        "over_limit_share": over,
    }


def histogram_quantile_rank(value: float, buckets: list[tuple[float, float]]) -> float:
    """Observations at or below `value` in cumulative `buckets` (linear inside a bucket)."""
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:
        if value <= bound:
            if bound == float("inf"):
                return previous_count
            return previous_count + (count - previous_count) * (value - previous_bound) / (
                bound - previous_bound
            )
        previous_bound, previous_count = bound, count
    return previous_count
