"""The dynamic batcher: the consumer that turns the queue into model batches, the worker
threads, and the answer of each request in the caller's order. The queue itself and the forming
of a batch (queue.py) and admission to the queue (admission.py) are plain, synchronous code.

How a request travels:

1. `score()` tokenizes the request's pairs off the event loop (`encode`); `score_encoded()`
   asks admission (`Admission.admit`), which refuses it at once when the queue is full or its
   expected wait too long (`Overloaded`), or when it alone would outlast its deadline
   (`RequestTooLarge`); an admitted request is queued, one item per pair.
2. One consumer task takes batches from the queue (`PairQueue.take_batch`: the oldest pair plus
   the neighbours in length that add the least padding, within the budget). Items whose request
   was cancelled or whose deadline passed are dropped there, before they reach the model.
   Shared across the streams (`split_across_streams`, on by default on CPU): while the work at
   hand (the queued real tokens plus what the running batches have left, at the recent pace
   per stream) is less than a full batch for each stream, it is shared out: the batch formed
   now holds at most its share, the work at hand over p = min(streams, work //
   `SPLIT_MIN_TOKENS`) parts, if p >= 2 (`share_of_work`). So a lone request of 17 similar
   pairs runs on two streams at once as 9 + 8 rows; a stream that comes free while the other
   still has half its batch to run takes half of what is left, not all of it, so that both
   finish together; and a 1-pair request, or one of fewer than 2 x `SPLIT_MIN_TOKENS` tokens,
   runs as one batch. Each batch is formed by `take_batch`, within the budget and the padding
   tolerance, and answers land by pair index, in the caller's order. Under load (a full batch
   at hand for every stream) batches are formed as without it.
3. The padded batch runs in a worker thread (the engines release the GIL): one thread per batch
   the scorer can run at once (`parallelism`: OpenVINO streams on CPU, ONNX Runtime sessions on
   CUDA, 1 for ONNX Runtime on CPU). While they run, the consumer pads and queues the next batch
   as soon as a full one is waiting, so the model never waits on the event loop; a partial batch
   instead keeps filling until a stream is free. At most `parallelism` batches run and one more
   waits behind them. A batch formed with nothing running and nothing left queued (a lone pair,
   or a lone request too small to split) runs alone on every core where the scorer has a way
   to (`Scorer.alone`: OpenVINO's streams take a core each); it holds every place until done.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from service import metrics
from service.engine.admission import Admission

# The configuration lives in batching_config.py; named here too for the importers that take it
# from the batcher (the app, the defaults test).
from service.engine.batching_config import (
    SPLIT_MIN_TOKENS,
    BatcherConfig,
    for_device,
    overtake_window,
    padding_tolerance_for,
    splits_across_streams,
)
from service.engine.errors import DeadlineExceeded, EngineError, EngineStopped, InferenceFailed
from service.engine.queue import Item, PairQueue, QueuedRequest
from service.engine.tickets import request_key
from service.engine.types import EncodedPair, Encoder, Scorer, pad_batch

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Batchers between start() and stop(), for the process-wide queue gauges.
_RUNNING: weakref.WeakSet[DynamicBatcher] = weakref.WeakSet()


def share_of_work(queued: int, running: float, streams: int, batch_tokens: int) -> int | None:
    """The real tokens a batch formed now may hold when `streams` streams share the work at
    hand: `queued` real tokens plus `running` tokens the running batches have left. None (a
    batch formed as ever) when that work is a full batch (`batch_tokens`) or more for every
    stream, too little for two parts of `SPLIT_MIN_TOKENS`, or when the share would hold every
    queued token anyway; else the work over its parts, rounded up."""
    work = queued + running
    if work >= streams * batch_tokens:
        return None
    parts = _parts_of(work, streams)
    if parts < 2:
        return None
    share = math.ceil(work / parts)
    return share if share < queued else None


def _parts_of(tokens: float, streams: int) -> int:
    """Into how many parts, one a stream, `tokens` real tokens are cut: each of
    `SPLIT_MIN_TOKENS` or more (1: not cut)."""
    return max(1, min(streams, int(tokens // SPLIT_MIN_TOKENS)))


def _queue_expected_wait() -> float:
    # The longest over the stages (and both models during a reload): the queue nearest to refusing
    # with 429. Read at scrape time, on the event loop like start() and stop(): the gauge holds no
    # batcher and is never stale.
    return max((b.expected_wait() or 0.0 for b in _RUNNING), default=0.0)


metrics.QUEUE_EXPECTED_WAIT.set_function(_queue_expected_wait)


def _queue_head_lag() -> float:
    # As the expected wait: the largest over the running batchers, read at scrape time.
    return max((b.head_lag for b in _RUNNING), default=1.0)


metrics.QUEUE_HEAD_LAG.set_function(_queue_head_lag)


@dataclass(frozen=True, slots=True)
class ScoredPair:
    """One pair's result.

    Attributes:
        score: Cappy's raw regression output (not squashed; may fall slightly outside [0, 1]).
        truncated: whether tokenization cut the pair to the model's max length.
        tokens: tokens the model saw for this pair.
    """

    score: float
    truncated: bool
    tokens: int


class _Request(QueuedRequest):
    """One `score()` call: its share of the queue, its future and its results so far."""

    __slots__ = ("future", "remaining", "scores")

    def __init__(
        self,
        future: asyncio.Future[list[ScoredPair]],
        encoded: list[EncodedPair],
        tokens: int,
        deadline: float | None,
    ) -> None:
        super().__init__(encoded, tokens, deadline)
        self.future = future
        self.scores = [0.0] * len(encoded)
        self.remaining = len(encoded)


class _Batch:
    """A padded batch handed to a worker thread at `submitted`; `slots`: the batcher's places it
    takes (1, or every stream and the waiting place for a batch that runs alone on every
    core)."""

    __slots__ = ("future", "items", "real_tokens", "slots", "submitted")

    def __init__(
        self,
        items: list[Item],
        future: asyncio.Future[tuple[np.ndarray, float, float]],
        real: int,
        slots: int,
        submitted: float,
    ) -> None:
        self.items = items
        self.future = future
        self.real_tokens = real
        self.submitted = submitted
        self.slots = slots


def _owner(item: Item) -> _Request:
    request = item.request
    assert isinstance(request, _Request)  # the only kind a batcher queues
    return request


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class DynamicBatcher:
    """Batches concurrent scoring requests for one model.

    Lifecycle: nothing runs before `start()`; `stop()` refuses new work, drains (or fails) what
    was accepted, and ends the consumer task and the worker threads. Both are meant to be called
    from the application's lifespan.

    Args:
        scorer: the model; `infer` is called only from the batcher's worker threads, at most
            `scorer.parallelism` calls at once.
        encode: tokenizes a request's pairs (instruction first); called in a thread.
        config: batching and admission limits.
        max_length: the model's longest input (tokens): `pad_to_multiple` never pads past it.
        clock: the monotonic clock of arrivals, deadlines and batch timings (the pace); tests
            inject one, so that a pace is set by the test and not by the host's load.
    """

    def __init__(
        self,
        scorer: Scorer,
        encode: Encoder,
        config: BatcherConfig | None = None,
        max_length: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._scorer = scorer
        self._clock = clock
        self._encode = encode
        self._config = for_device(config or BatcherConfig(), scorer.device)
        assert self._config.max_batch_tokens is not None and self._config.max_batch_size is not None
        assert self._config.max_wait_ms is not None
        self.max_batch_tokens: int = self._config.max_batch_tokens
        self.max_batch_size: int = self._config.max_batch_size
        # Batches the scorer can run at once (OpenVINO streams); one worker thread each.
        self._workers = max(1, scorer.parallelism)
        self.padding_tolerance = padding_tolerance_for(self._config, scorer.device)
        self.max_wait_ms: float = self._config.max_wait_ms
        self._split = self._workers > 1 and splits_across_streams(self._config, scorer.device)
        # A batch with nothing beside it or behind it runs on every core where the streams
        # take one each (OpenVINO on CPU): a lone pair, or a lone request too small to split.
        self._alone = scorer.alone()
        self._queue = PairQueue(
            max_batch_tokens=self.max_batch_tokens,
            max_batch_size=self.max_batch_size,
            padding_tolerance=self.padding_tolerance,
            pad_to_multiple=self._config.pad_to_multiple,
            max_length=max_length,
            cross_request=self._config.cross_request,
            expire=self._expire,
            window=overtake_window(self._config),
        )
        self._admission = Admission(
            self._queue,
            max_queue_tokens=self._config.max_queue_tokens,
            max_queue_wait_s=self._config.max_queue_wait_s,
            default_timeout_s=self._config.default_timeout_s,
            # A pace counts once it has measured at least a full batch's worth of tokens.
            min_pace_tokens=self.max_batch_tokens,
            clock=clock,
        )
        self._requests: set[_Request] = set()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._accepting = False
        self._draining = False
        self._in_flight = 0

    # --- public API -----------------------------------------------------------------------------

    @property
    def config(self) -> BatcherConfig:
        return self._config

    @property
    def alive(self) -> bool:
        """Whether the consumer task is running (False before start, after stop, or if it died)."""
        return self._task is not None and not self._task.done()

    @property
    def accepting(self) -> bool:
        """Whether `score()` accepts new requests."""
        return self._accepting and self.alive

    def expected_wait(self, tokens: int | None = None) -> float | None:
        """Seconds until `tokens` (default: the queued tokens) will have drained: their model
        time at the recent pace with every stream busy, scaled by how much longer the queue's
        oldest pairs have in fact waited (admission.py); None while too little work has run to
        know the pace."""
        return self._admission.expected_wait(tokens)

    @property
    def head_lag(self) -> float:
        """The factor on the expected wait: how much longer the queue's oldest pairs have
        recently waited than the work ahead of them was expected to take (admission.py)."""
        return self._admission.lag.factor

    async def start(self) -> None:
        """Starts the worker threads and the consumer task.

        Raises:
            RuntimeError: if it is already running.
        """
        if self.alive:
            raise RuntimeError("the batcher is already running")
        self._executor = ThreadPoolExecutor(
            max_workers=self._workers, thread_name_prefix="cappy-model"
        )
        self._draining = False
        self._in_flight = 0
        self._task = asyncio.create_task(self._consume(), name="cappy-batcher")
        self._accepting = True
        _RUNNING.add(self)

    async def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops accepting work, then ends the consumer task and the worker threads.

        Args:
            drain: score everything already accepted before stopping; otherwise fail it with
                `EngineStopped`. A batch already running on the model always completes.
            timeout: seconds to wait for the drain; what is still queued then is failed.
        """
        self._accepting = False
        task = self._task
        if task is not None and not task.done():
            if drain:
                self._draining = True
                self._notify()
                done, _ = await asyncio.wait([task], timeout=timeout)
                if not done:
                    logger.warning(
                        "the batcher did not drain within %.1f s; failing %d queued pairs",
                        timeout,
                        self._queue.pairs,
                    )
            if not task.done():
                task.cancel()
                await asyncio.wait([task])
        self._fail_all()
        _RUNNING.discard(self)
        self._set_queue_gauges()
        executor, self._executor = self._executor, None
        if executor is not None:
            # Waits for a batch still running on the model; the session must not be torn down
            # under it.
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    async def run_on_workers(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Runs `fn(*args)` on the model's worker threads, queued in turn with the batches.

        For other model work of the same process (the exact re-scoring of near-tied leaders):
        it then takes a worker's turn instead of running beside every stream and
        oversubscribing the cores. Before start() or after stop() there are no batches to
        share with, and it runs in a plain thread.
        """
        executor = self._executor  # stop() clears it before shutting the threads down
        if executor is None:
            return await asyncio.to_thread(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def score(
        self, pairs: Sequence[tuple[str, str]], *, deadline: float | None = None
    ) -> list[ScoredPair]:
        """Scores (instruction, response) pairs, batched with concurrent requests.

        Cancelling the awaiting task (the client went away) drops the request's queued pairs
        before they reach the model.

        Args:
            pairs: the pairs to score; any number up to what `max_queue_tokens` holds.
            deadline: absolute time on the batcher's clock (`time.monotonic()` unless one was
                injected) by which the answer is needed; None means now plus `default_timeout_s`.

        Returns:
            One result per pair, in the order of `pairs`.

        Raises:
            Overloaded: the queue is full, its expected wait too long, or the request would miss
                its deadline behind it (at once, before any work is queued).
            RequestTooLarge: the request alone needs more than `max_queue_tokens` tokens, or
                more model time than its deadline leaves at the model's recent pace.
            DeadlineExceeded: the deadline passed first; the request's queued pairs are dropped.
            EngineStopped: the batcher is not running or is shutting down.
            InferenceFailed: the model raised on a batch holding one of these pairs.
        """
        if not self.accepting:
            raise EngineStopped()
        if not pairs:
            return []
        deadline = self._admission.deadline(deadline)
        self._admission.check_queue()  # before tokenizing: a full queue costs the caller nothing
        return await self.score_encoded(await self.encode(pairs), deadline=deadline)

    async def encode(self, pairs: Sequence[tuple[str, str]]) -> list[EncodedPair]:
        """Tokenizes pairs off the event loop (instruction first), as `score` does."""
        started = time.perf_counter()
        encoded = await asyncio.to_thread(self._encode, pairs)
        metrics.TOKENIZE_TIME.observe(time.perf_counter() - started)
        if len(encoded) != len(pairs):
            raise RuntimeError(f"encode returned {len(encoded)} items for {len(pairs)} pairs")
        return encoded

    async def score_encoded(
        self, encoded: Sequence[EncodedPair], *, deadline: float | None = None
    ) -> list[ScoredPair]:
        """Scores pairs already tokenized (by `encode`, or kept from an earlier stage of a
        ranking cascade); otherwise exactly `score`."""
        if not self.accepting:
            raise EngineStopped()
        if not encoded:
            return []
        encoded = list(encoded)
        deadline = self._admission.deadline(deadline)
        tokens = sum(pair.length for pair in encoded)
        key = request_key(pair.input_ids for pair in encoded)
        now = self._admission.admit(tokens, deadline, key)
        if not self.accepting:
            raise EngineStopped()

        request = _Request(asyncio.get_running_loop().create_future(), encoded, tokens, deadline)
        request.pace = self._admission.pace.tokens_per_second()
        self._requests.add(request)
        self._queue.add(request, now)
        self._set_queue_gauges()
        self._notify()
        try:
            async with asyncio.timeout(None if deadline is None else deadline - self._clock()):
                return await request.future
        except TimeoutError:
            self._abandon(request, "deadline")
            raise DeadlineExceeded() from None
        except asyncio.CancelledError:
            self._abandon(request, "cancelled")
            raise

    # --- queue bookkeeping ----------------------------------------------------------------------

    def _abandon(self, request: _Request, reason: str, error: EngineError | None = None) -> None:
        """Ends a request that will not be answered with scores: its queued items become stale
        (skipped before the model) and `error`, if any, is raised to its caller."""
        if request.done:
            return
        request.done = True
        self._requests.discard(request)
        dropped = self._queue.forget(request)
        if dropped:
            metrics.PAIRS_DROPPED.labels(reason=reason).inc(dropped)
            self._set_queue_gauges()
        if error is not None and not request.future.done():
            request.future.set_exception(error)

    def _expire(self, request: QueuedRequest) -> None:
        assert isinstance(request, _Request)  # the only kind this batcher queues
        self._abandon(request, "deadline", DeadlineExceeded())

    def _fail_all(self) -> None:
        for request in list(self._requests):
            self._abandon(request, "stopped", EngineStopped())
        self._queue.clear()

    def _set_queue_gauges(self) -> None:
        # The gauges cover every running batcher of the process (one per scoring stage).
        metrics.QUEUE_PAIRS.set(sum(b._queue.pairs for b in _RUNNING))
        metrics.QUEUE_TOKENS.set(sum(b._queue.tokens for b in _RUNNING))

    def _notify(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the consumer ---------------------------------------------------------------------------

    async def _consume(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("the batcher's consumer died; failing every pending request")
        finally:
            self._accepting = False
            self._fail_all()

    async def _run(self) -> None:
        max_wait = self.max_wait_ms / 1000.0
        workers = self._workers
        in_flight: list[_Batch] = []
        while True:
            for finished in [b for b in in_flight if b.future.done()]:
                in_flight.remove(finished)
                self._complete(finished)
            if self._queue.pairs == 0:
                if not in_flight:
                    # Nothing queued, nothing running: the model idles, and the pace stops
                    # counting until the next batch starts. (A batch formed late, behind a busy
                    # event loop, while pairs waited, is no idle spell: that gap is part of the
                    # rate at which the queue drains.)
                    self._admission.pace.idle()
                if self._queue.has_stale():
                    self._queue.clear()  # only stale entries left
                if self._draining and not in_flight:
                    return
                await self._wait(in_flight, None)
                continue
            busy = sum(batch.slots for batch in in_flight)
            if busy > workers:
                await self._wait(in_flight, None)
                continue
            now = self._clock()
            full = (
                self._queue.pairs >= self.max_batch_size
                or self._queue.tokens >= self.max_batch_tokens
            )
            if not full and not self._draining:
                if busy >= workers:
                    # The model is busy: let the partial batch keep filling until it is free.
                    await self._wait(in_flight, None)
                    continue
                oldest = self._queue.oldest(now)
                if oldest is None:
                    continue  # everything queued had expired
                launch_at = oldest.arrival + max_wait
                if now < launch_at:
                    await self._wait(in_flight, launch_at - now)
                    continue
            items = self._queue.take_batch(now, self._share(in_flight, now))
            self._set_queue_gauges()
            if not items:
                if self._queue.pairs:
                    raise RuntimeError(
                        "queue bookkeeping is inconsistent: pairs counted, none queued"
                    )
                continue
            alone = self._alone if not in_flight and not self._queue.pairs else None
            submitted = self._submit(items, alone)
            if submitted is not None:
                in_flight.append(submitted)

    def _share(self, in_flight: list[_Batch], now: float) -> int | None:
        """The real tokens the batch formed now may hold when the work at hand is shared across
        the streams (`share_of_work`); None for a batch formed as ever. A running batch has
        left its tokens less what the recent pace per stream has run of them since it started
        (all of them while the pace is unknown)."""
        if not self._split:
            return None
        rate = self._admission.pace.tokens_per_second()
        per_stream = rate / self._workers if rate else 0.0
        running = sum(
            max(0.0, batch.real_tokens - (now - batch.submitted) * per_stream)
            for batch in in_flight
        )
        return share_of_work(self._queue.tokens, running, self._workers, self.max_batch_tokens)

    def idle_parts(self, pairs: int, tokens: int) -> int:
        """Into how many parts other model work (`run_on_workers`: the exact re-scoring of a
        set's near-ties) of `pairs` pairs and `tokens` real tokens is cut to run at once on the
        idle streams: at most a pair each and a part per idle stream, each part of
        `SPLIT_MIN_TOKENS` or more; 1 while pairs are queued (the idle streams are theirs), with
        the split off, or when it is a full batch or more for every idle stream."""
        idle = self._workers - self._in_flight
        if self._queue.pairs or not self._split or idle < 2:
            return 1
        if pairs >= idle * self.max_batch_size or tokens >= idle * self.max_batch_tokens:
            return 1  # a full batch for every idle stream: nothing to share out
        return max(1, min(pairs, _parts_of(tokens, idle)))

    async def _wait(self, in_flight: list[_Batch], timeout: float | None) -> None:
        """Sleeps until new work is queued, a running batch completes, stop() is called, or
        `timeout` seconds pass."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        waits: list[asyncio.Future[Any]] = [waiter]
        waits.extend(batch.future for batch in in_flight)
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiter = None

    def _submit(
        self, items: list[Item], alone: Callable[[dict[str, np.ndarray]], np.ndarray] | None
    ) -> _Batch | None:
        """Pads a batch and queues it on the worker threads (run by `alone` on every core, if
        given); None if padding failed."""
        rows = len(items)
        width = self._queue.width(max(item.length for item in items))
        try:
            feeds = pad_batch(
                [item.encoded for item in items],
                self._scorer.pad_token_id,
                self._scorer.input_names,
                width,
            )
        except Exception as exc:
            self._fail_batch(items, exc)
            return None
        real = sum(item.length for item in items)
        padded = rows * width
        metrics.BATCH_SIZE.observe(rows)
        metrics.BATCH_TOKENS.observe(padded)
        metrics.BATCH_PADDING.observe((padded - real) / padded if padded else 0.0)
        assert self._executor is not None
        submitted = self._clock()
        self._admission.pace.begin(submitted)
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self._infer, alone or self._scorer.infer, feeds
        )
        # After a hard stop nobody reads the outcome; reading it here keeps asyncio from logging
        # "exception was never retrieved".
        future.add_done_callback(_retrieve)
        # Alone, it holds every stream and the place of the batch that would wait behind them:
        # nothing else reaches the model until it is done.
        slots = self._workers + 1 if alone is not None else 1
        self._in_flight += slots
        return _Batch(items, future, real, slots, submitted)

    def _infer(
        self, infer: Callable[[dict[str, np.ndarray]], np.ndarray], feeds: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, float, float]:
        """Runs in a worker thread."""
        started = self._clock()
        scores = infer(feeds)
        return scores, started, self._clock()

    def _complete(self, batch: _Batch) -> None:
        """Hands a finished batch's scores to their requests (on the event loop)."""
        self._in_flight -= batch.slots
        items = batch.items
        future = batch.future
        if future.cancelled():  # only by a hard stop, which fails every request anyway
            return
        error = future.exception()
        if error is not None:
            self._fail_batch(items, error)
            return
        raw, started, finished = future.result()
        try:
            values = np.asarray(raw, dtype=np.float64).reshape(-1)
            if values.shape[0] != len(items):
                raise ValueError(f"{values.shape[0]} scores came back for {len(items)} rows")
        except Exception as exc:
            self._fail_batch(items, exc)
            return

        elapsed = finished - started
        metrics.INFERENCE_TIME.observe(elapsed)
        metrics.PAIRS_SCORED.inc(len(items))
        metrics.TOKENS_SCORED.inc(batch.real_tokens)
        self._admission.pace.track(batch.real_tokens, started, finished)
        self._admission.observe_seed(items[0], started)  # a batch starts with its oldest pair
        truncated = 0
        queue_time = metrics.QUEUE_TIME
        for item, value in zip(items, values.tolist(), strict=True):
            queue_time.observe(started - item.arrival)
            request = _owner(item)
            if item.encoded.truncated:
                truncated += 1
            if request.done:
                continue
            request.scores[item.index] = value
            request.remaining -= 1
            if request.remaining == 0:
                self._resolve(request)
        if truncated:
            metrics.PAIRS_TRUNCATED.inc(truncated)

    def _resolve(self, request: _Request) -> None:
        request.done = True
        self._requests.discard(request)
        if not request.future.done():
            request.future.set_result(
                [
                    ScoredPair(score, pair.truncated, pair.length)
                    for score, pair in zip(request.scores, request.encoded, strict=True)
                ]
            )

    def _fail_batch(self, items: list[Item], cause: BaseException) -> None:
        """Fails the requests of a batch the model could not score; the batcher keeps going."""
        logger.error("model inference failed on a batch of %d pairs", len(items), exc_info=cause)
        for request in dict.fromkeys(_owner(item) for item in items):
            if not request.done:
                error = InferenceFailed()
                error.__cause__ = cause
                self._abandon(request, "failed", error)
