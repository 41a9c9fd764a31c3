"""The batcher's configuration: its limits (`BatcherConfig`) and the values left unset there,
resolved for the device the scorer runs on (batch limits, padding tolerance)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from service import defaults
from service.defaults import DEVICE_BATCH_LIMITS, DEVICE_MAX_WAIT_MS

# Padding tolerance on CPU when none is configured: measured best on the MiniLM benchmark
# (0.1 against 0.25 and 0.5, at concurrency 32 and at concurrency 1).
CPU_PADDING_TOLERANCE = 0.1

# Real tokens that each part of work shared across the streams holds on average, at the least:
# less work runs as one batch, since each part pays a batch's fixed cost (padding, a worker's
# turn, the engine's call). 64 tokens are ~4 ms of one core for MiniLM bf16 (~90 pairs of ~160
# tokens per CPU-second, loadtests/README.md). A starting value, not yet measured against others.
SPLIT_MIN_TOKENS = 64

# Share of `max_queue_wait_s` after its seed's arrival within which a pair may join a batch
# (queue.py): newer pairs overtake older ones of other lengths by no more than that.
OVERTAKE_WINDOW_SHARE = 0.1


@dataclass(frozen=True, slots=True)
class BatcherConfig:
    """Batching and admission limits.

    Attributes:
        max_batch_tokens: padded tokens per batch (rows x longest row). A single pair longer than
            this still runs, alone. None picks by the scorer's device (`DEVICE_BATCH_LIMITS`).
        max_batch_size: rows per batch; None picks by the scorer's device.
        max_wait_ms: how long the oldest queued pair may wait for its batch to fill while the
            model is idle. No wait when a full batch is queued or the model is busy. None picks
            by the scorer's device (`DEVICE_MAX_WAIT_MS`: none on CPU, 2 ms on CUDA).
        max_queue_tokens: real tokens the queue may hold; a request that would exceed it is
            refused with `Overloaded`, one that alone exceeds it with `RequestTooLarge`. A cap
            on memory; `max_queue_wait_s` is the one that keeps waits short.
        max_queue_wait_s: the longest expected queue wait (the queued tokens at the model's
            recent pace, every stream counted, scaled by the head's lag: admission.py) at
            which a request is still admitted; beyond it, and for a request that could not be
            answered before its deadline behind the queue, `Overloaded` at once with a
            Retry-After of when the queue will have drained enough.
            Admission looks at the queue before the request, not at its size, so large requests
            are admitted as readily as small ones. The pace counts once `MIN_PACE_BATCHES`
            batches holding a full batch budget of tokens have run (admission.py); until then
            only the oldest queued pair's age applies. None: the token cap alone.
        default_timeout_s: deadline of a request that brings none; None for no deadline.
        padding_tolerance: an item joins a batch only if the padding it adds is at most this many
            tokens per token of its own (1.0: a pair never costs more than about twice its
            length). None picks by the scorer's device: `CPU_PADDING_TOLERANCE` on CPU, where a
            padded token costs as much as a real one and batch size barely matters above a few
            rows; `math.inf` (batches filled by budget alone) on CUDA, which is not compute-bound
            and gains from fuller batches.
        cross_request: batch pairs of different requests together (the point of a dynamic
            batcher). False gives the per-request baseline the benchmarks compare with: a batch
            holds pairs of one request only, shortest first.
        pad_to_multiple: a batch's width is its longest row rounded up to a multiple of this
            (never past the model's max length), and lengths are compared in these steps, so
            pairs of the same step share a batch for free. Fewer distinct shapes: OpenVINO on
            CPU ran the served batches of the benchmark ~3% faster padded to multiples of 8,
            though they held 1.3% more tokens; GPUs favour multiples of 8
            too. 1 pads to the longest row only.
        split_across_streams: while the work at hand (queued, plus what running batches have
            left) is less than a full batch for each of the k >= 2 streams, a batch holds at
            most its share of it (up to k parts, each of `SPLIT_MIN_TOKENS` real tokens or
            more), so that a lone request runs on every stream at once and the streams finish
            together (the rule: batcher.py). Under load batches are formed as without it. None
            picks by the scorer's device: on for CPU, where each OpenVINO stream is one core
            and a lone batch leaves the others idle; off for CUDA, whose streams share one
            device (not measured there). False: batches formed by the budget and padding rule alone.
    """

    # The service's defaults (service/defaults.py, which Settings reads), so that a batcher built
    # without a config behaves as the served one.
    max_batch_tokens: int | None = None
    max_batch_size: int | None = None
    max_wait_ms: float | None = None
    max_queue_tokens: int = defaults.MAX_QUEUE_TOKENS
    max_queue_wait_s: float | None = defaults.MAX_QUEUE_WAIT_S
    default_timeout_s: float | None = defaults.REQUEST_TIMEOUT_S
    padding_tolerance: float | None = None
    cross_request: bool = True
    pad_to_multiple: int = defaults.PAD_TO_MULTIPLE
    split_across_streams: bool | None = None

    def __post_init__(self) -> None:
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be at least 1")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_wait_ms is not None and self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        if self.max_queue_tokens < 1:
            raise ValueError("max_queue_tokens must be at least 1")
        if self.max_queue_wait_s is not None and self.max_queue_wait_s <= 0:
            raise ValueError("max_queue_wait_s must be positive or None")
        if self.default_timeout_s is not None and self.default_timeout_s <= 0:
            raise ValueError("default_timeout_s must be positive or None")
        if self.padding_tolerance is not None and self.padding_tolerance < 0:
            raise ValueError("padding_tolerance must not be negative")
        if self.pad_to_multiple < 1:
            raise ValueError("pad_to_multiple must be at least 1")


# Batch limits (padded tokens, rows) when none are configured: DEVICE_BATCH_LIMITS. On CPU a
# padded token costs as much as a real one and rows beyond a few dozen gain nothing. A GPU needs
# far more work per launch to fill its multiprocessors (a 64 x 128 batch of Cappy-large is ~6
# TFLOP: ~8 ms on an H200, where launch and copy overheads are ~1 ms), so it gets four times the
# budget and rows; the GPU bench (loadtests/gpu_bench.py) reports the figures these give.
def for_device(config: BatcherConfig, device: str) -> BatcherConfig:
    """`config` with the batch limits and the fill wait it leaves unset filled in for `device`
    ("cuda" or "cpu"): `DEVICE_BATCH_LIMITS`, `DEVICE_MAX_WAIT_MS`."""
    kind = "cuda" if device == "cuda" else "cpu"
    tokens, rows = DEVICE_BATCH_LIMITS[kind]
    wait = config.max_wait_ms
    return replace(
        config,
        max_batch_tokens=config.max_batch_tokens or tokens,
        max_batch_size=config.max_batch_size or rows,
        max_wait_ms=DEVICE_MAX_WAIT_MS[kind] if wait is None else wait,
    )


def padding_tolerance_for(config: BatcherConfig, device: str) -> float:
    """The configured padding tolerance, or the device's when none is: `CPU_PADDING_TOLERANCE`
    on CPU, unlimited (batches filled by budget alone) on CUDA."""
    if config.padding_tolerance is not None:
        return config.padding_tolerance
    return math.inf if device == "cuda" else CPU_PADDING_TOLERANCE


def splits_across_streams(config: BatcherConfig, device: str) -> bool:
    """The configured `split_across_streams`, or the device's when none is: on for CPU, off for
    CUDA."""
    if config.split_across_streams is not None:
        return config.split_across_streams
    return device != "cuda"


def overtake_window(config: BatcherConfig) -> float | None:
    """Seconds after a batch's seed within which a pair may join it; None (no bound) when
    there is no wait limit to keep."""
    wait = config.max_queue_wait_s
    return None if wait is None else OVERTAKE_WINDOW_SHARE * wait
