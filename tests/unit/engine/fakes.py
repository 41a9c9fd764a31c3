"""A fake model, fake tokenizer and fake clock for driving DynamicBatcher (test_batcher.py,
test_admission.py).

The fake tokenizer turns each word into one token (digits keep their value, other words become
1), so a pair's length and its score (the sum of its ids) are known in advance, and a marker
number in a response shows whether that pair ever reached the model. The fake clock moves only
when a test (or a `PacedScorer`) moves it, so a pace, a wait or an age is the test's, whatever the
host's load.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import numpy as np

from service.engine.admission import MIN_PACE_BATCHES
from service.engine.batcher import DynamicBatcher, ScoredPair
from service.engine.batching_config import BatcherConfig
from service.engine.types import EncodedPair, Encoder, Scorer, ScorerDevice
from service.metrics import REGISTRY

MAX_LENGTH = 512
CLS, SEP = 101, 102


def encode(pairs: Sequence[tuple[str, str]]) -> list[EncodedPair]:
    out = []
    for instruction, response in pairs:
        ids = [CLS, *map(_word_id, instruction.split()), SEP, *map(_word_id, response.split()), SEP]
        truncated = len(ids) > MAX_LENGTH
        out.append(EncodedPair(np.asarray(ids[:MAX_LENGTH], dtype=np.int64), None, truncated))
    return out


def _word_id(word: str) -> int:
    return int(word) if word.isdigit() else 1


def pair(length: int, marker: int = 7) -> tuple[str, str]:
    """A pair that encodes to exactly `length` tokens (>= 5), its response ending in `marker`."""
    assert length >= 5
    return "q", " ".join(["w"] * (length - 5) + [str(marker)])


def expected_score(p: tuple[str, str]) -> float:
    return float(encode([p])[0].input_ids.sum())


class FakeScorer(Scorer):
    """Scores a row as the sum of its ids; records each batch; can be held or made to fail."""

    name = "fake"
    input_names = ("input_ids", "attention_mask")
    pad_token_id = 0
    precision = "fp32"
    parallelism = 1

    def __init__(self, fail_on: int | None = None, device: ScorerDevice = "cpu") -> None:
        self.device = device
        self.batches: list[list[np.ndarray]] = []  # per batch, each row's unpadded ids
        self.shapes: list[tuple[int, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on = fail_on

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        self.shapes.append(ids.shape)
        self.batches.append([row[m.astype(bool)] for row, m in zip(ids, mask, strict=True)])
        assert self.gate.wait(10), "the test never released the model"
        if self.fail_on is not None and (ids == self.fail_on).any():
            raise RuntimeError("secret internal detail")
        return (ids * mask).sum(axis=1).astype(np.float32)

    def warmup(self, stop: threading.Event | None = None) -> None:
        pass

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def saw(self, marker: int) -> bool:
        return any((row == marker).any() for batch in self.batches for row in batch)

    def rows_with(self, marker: int) -> int:
        return sum(int((row == marker).any()) for batch in self.batches for row in batch)


class FakeClock:
    """A monotonic clock for the batcher (`clock=`) that moves only by `advance` (from any
    thread). The batcher's fill wait (`max_wait_ms`) then ends only when the clock is advanced
    past it: use `max_wait_ms=0` unless a test means to hold a batch open."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class PacedScorer(FakeScorer):
    """A model of known pace: each batch moves `clock` by `seconds_per_token` per real token
    (before waiting at the gate), so its busy time, and the pace, are exact."""

    def __init__(self, clock: FakeClock, seconds_per_token: float) -> None:
        super().__init__()
        self.clock = clock
        self.seconds_per_token = seconds_per_token

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        self.clock.advance(self.seconds_per_token * int(feeds["attention_mask"].sum()))
        return super().infer(feeds)


@contextlib.asynccontextmanager
async def running(
    scorer: FakeScorer,
    *,
    clock: Callable[[], float] = time.monotonic,
    encoder: Encoder = encode,
    **config: Any,
) -> AsyncIterator[DynamicBatcher]:
    batcher = DynamicBatcher(scorer, encoder, BatcherConfig(**config), clock=clock)
    await batcher.start()
    try:
        yield batcher
    finally:
        scorer.release()
        await batcher.stop(drain=False)


async def eventually(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Waits for `condition`, an event of the test's making; the timeout only bounds a test
    whose event never comes (a defect), it is not a measure of speed."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.001)


async def measure_pace(batcher: DynamicBatcher) -> float:
    """Runs, one batch at a time, the work the batcher needs before its pace counts
    (`MIN_PACE_BATCHES` batches holding its batch budget of tokens); returns the pace."""
    length = 64
    fits = min(batcher.max_batch_tokens, batcher.config.max_queue_tokens) // length
    rows = max(1, min(batcher.max_batch_size, fits))
    batches = max(MIN_PACE_BATCHES, -(-batcher.max_batch_tokens // (rows * length)))
    for _ in range(batches):
        if pace(batcher) is not None:
            break  # known already (work that ran before)
        await batcher.score([pair(length)] * rows)
    known = pace(batcher)
    assert known is not None
    return known


async def hold_model(batcher: DynamicBatcher, scorer: FakeScorer) -> asyncio.Task[Any]:
    """Occupies the model with a one-pair batch that blocks until `scorer.release()`."""
    scorer.hold()
    seen = len(scorer.batches)
    task = asyncio.create_task(batcher.score([pair(5, marker=1)]))
    await eventually(lambda: len(scorer.batches) > seen)
    return task


async def queue_request(
    batcher: DynamicBatcher, pairs: list[tuple[str, str]], **kwargs: Any
) -> asyncio.Task[list[ScoredPair]]:
    """Starts a request and returns once its pairs are queued (or already taken into a batch)."""
    before = pending_requests(batcher)
    task = asyncio.create_task(batcher.score(pairs, **kwargs))
    await eventually(lambda: pending_requests(batcher) > before)
    return task


# What the tests read of a batcher's state, which the service itself never asks for.


def pending_requests(batcher: DynamicBatcher) -> int:
    """Requests admitted and not yet answered."""
    return len(batcher._requests)


def batches_in_flight(batcher: DynamicBatcher) -> int:
    """Batches handed to the worker threads and not yet completed."""
    return batcher._in_flight


def queued_work(batcher: DynamicBatcher) -> tuple[int, int]:
    """(pairs, real tokens) waiting for a batch."""
    return batcher._queue.pairs, batcher._queue.tokens


def pace(batcher: DynamicBatcher) -> float | None:
    """The model's measured pace in tokens per second; None until it counts."""
    return batcher._admission.pace.tokens_per_second()


def overloaded(batcher: DynamicBatcher) -> bool:
    """Whether any new request would be refused now (queue full or its wait too long)."""
    return batcher._admission.retry_after(0) is not None


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0
