"""Every Prometheus collector of the service, on one explicit registry.

Names are part of the user interface (dashboards and alerts depend on them): prefix `cappy_`,
seconds for durations, histograms whose buckets resolve 1 ms to 10 s.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

REGISTRY = CollectorRegistry(auto_describe=True)
# process_cpu_seconds_total, process_resident_memory_bytes, open fds (Linux): the standard names.
ProcessCollector(registry=REGISTRY)

# 1 ms .. 10 s, roughly x1.5-2 apart; 12.5 and 15 s to read a queue time just past the default
# 10 s wait limit; a tail for slow proxy requests.
# fmt: off
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25,
    0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 3.5, 5.0, 7.5, 10.0, 12.5, 15.0, 20.0, 30.0, 60.0,
)
# fmt: on
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
FRACTION_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# --- HTTP ---------------------------------------------------------------------------------------
REQUEST_DURATION = Histogram(
    "cappy_request_duration_seconds",
    "End-to-end HTTP request duration by route and status code.",
    ["route", "status"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
REQUESTS_REJECTED = Counter(
    "cappy_requests_rejected_total",
    "Requests refused before scoring, by reason (overloaded, deadline, invalid, unauthorized...).",
    ["reason"],
    registry=REGISTRY,
)

# --- batcher ------------------------------------------------------------------------------------
QUEUE_TIME = Histogram(
    "cappy_queue_time_seconds",
    "Time a pair waited in the batcher queue before its batch started.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
INFERENCE_TIME = Histogram(
    "cappy_inference_time_seconds",
    "Model run time of one batch.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
TOKENIZE_TIME = Histogram(
    "cappy_tokenize_time_seconds",
    "Tokenization time of one request's pairs.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "cappy_batch_size",
    "Pairs per model batch.",
    buckets=SIZE_BUCKETS,
    registry=REGISTRY,
)
BATCH_TOKENS = Histogram(
    "cappy_batch_tokens",
    "Padded tokens per model batch (rows x longest row).",
    buckets=TOKEN_BUCKETS,
    registry=REGISTRY,
)
BATCH_PADDING = Histogram(
    "cappy_batch_padding_fraction",
    "Fraction of a batch's padded tokens that are padding.",
    buckets=FRACTION_BUCKETS,
    registry=REGISTRY,
)
QUEUE_PAIRS = Gauge("cappy_queue_pairs", "Pairs waiting in the batcher queue.", registry=REGISTRY)
QUEUE_TOKENS = Gauge(
    "cappy_queue_tokens", "Tokens waiting in the batcher queue.", registry=REGISTRY
)
# Read at scrape time from the running batchers (engine/batcher.py binds it with set_function):
# always fresh, and the signal Kubernetes scales on (deploy/k8s/hpa.yaml).
QUEUE_EXPECTED_WAIT = Gauge(
    "cappy_queue_expected_wait_seconds",
    "Expected queue wait of a request joining now: queued tokens at the model's recent pace, "
    "scaled by cappy_queue_head_lag, the estimate admission refuses on (CAPPY_MAX_QUEUE_WAIT_S); "
    "the longest of the process's batchers, 0 when nothing is queued or before the first batch "
    "ran.",
    registry=REGISTRY,
)
QUEUE_HEAD_LAG = Gauge(
    "cappy_queue_head_lag",
    "How much longer the queue's oldest pairs have recently waited than the work ahead of them "
    "was expected to take (later requests overtaking them): the factor on the expected wait, "
    "at least 1; the largest of the process's batchers, 1 when none runs.",
    registry=REGISTRY,
)
PAIRS_SCORED = Counter("cappy_pairs_scored_total", "Pairs scored by the model.", registry=REGISTRY)
TOKENS_SCORED = Counter(
    "cappy_tokens_scored_total", "Real (unpadded) tokens scored by the model.", registry=REGISTRY
)
RETRY_TICKETS = Counter(
    "cappy_retry_tickets_total",
    "Retry-After promises of refused requests (service/engine/tickets.py), by outcome: issued, "
    "claimed (the request's retry was admitted), expired (it did not come back in time).",
    ["outcome"],
    registry=REGISTRY,
)

PAIRS_RESCORED = Counter(
    "cappy_pairs_rescored_total",
    "Near-tied leaders of a candidate set re-scored by a more precise engine for ranking, by "
    "that engine's precision (bf16 after the int8 screen, fp32).",
    ["precision"],
    registry=REGISTRY,
)
PAIRS_TRUNCATED = Counter(
    "cappy_pairs_truncated_total",
    "Pairs truncated to the model's max length before scoring.",
    registry=REGISTRY,
)
PAIRS_DROPPED = Counter(
    "cappy_pairs_dropped_total",
    "Pairs dropped before reaching the model, by reason (cancelled, deadline).",
    ["reason"],
    registry=REGISTRY,
)

# --- upstream / proxy ---------------------------------------------------------------------------
UPSTREAM_CALL_DURATION = Histogram(
    "cappy_upstream_call_duration_seconds",
    "Duration of one upstream LLM API call, by outcome (ok, error, timeout).",
    ["outcome"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "cappy_upstream_errors_total",
    "Failed upstream calls by kind (http_4xx, http_5xx, rate_limited, timeout, connection, "
    "malformed).",
    ["kind"],
    registry=REGISTRY,
)
UPSTREAM_SAMPLES_REPAIRED = Counter(
    "cappy_upstream_samples_repaired_total",
    "Upstream samples whose text was repaired before scoring, by reason (lone_surrogate: "
    "unpaired UTF-16 surrogates, which are not Unicode, replaced by U+FFFD).",
    ["reason"],
    registry=REGISTRY,
)
UPSTREAM_RETRIES = Counter(
    "cappy_upstream_retries_total", "Upstream call retries.", registry=REGISTRY
)
UPSTREAM_IN_FLIGHT = Gauge(
    "cappy_upstream_in_flight", "Upstream calls in flight.", registry=REGISTRY
)
PROXY_CANDIDATES = Histogram(
    "cappy_proxy_candidates",
    "Candidates gathered per proxy request.",
    buckets=(1, 2, 4, 8, 12, 16, 17, 24, 32, 64),
    registry=REGISTRY,
)
PROXY_WINNER = Counter(
    "cappy_proxy_winning_decoding_total",
    "Which decoding produced the selected sample.",
    ["decoding"],
    registry=REGISTRY,
)
PROXY_DURATION = Histogram(
    "cappy_proxy_duration_seconds",
    "End-to-end proxy latency: fan-out, scoring and selection.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
