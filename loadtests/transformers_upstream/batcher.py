"""The queue between the HTTP threads and the model: requests wait here and one worker thread runs
them as batches.

A batch is requests with the same `max_tokens` (a batch runs to its largest budget, so mixing
budgets would make short requests wait for long ones), taken first come first served, up to
`max_rows` rows and `max_batch_tokens` padded positions (rows x (longest prompt + max_tokens):
what the KV cache holds). When the worker is free and finds work, it waits up to `max_wait_s`
after the oldest request's arrival for the batch to fill; under load the queue holds a full
batch already and nothing waits. Sampling settings do not split batches: each row samples by its
own (loadtests.transformers_upstream.sampling).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loadtests.transformers_upstream.engine import Row, RowOutput

logger = logging.getLogger(__name__)

RunBatch = Callable[[Sequence[Row]], list[RowOutput]]


class Overloaded(RuntimeError):
    """The queue holds `max_queue_rows` rows already."""


class Stopped(RuntimeError):
    """The batcher was stopped before the request ran."""


@dataclass
class Job:
    """One request's rows and, once run, their outputs (or the error that stopped them)."""

    rows: list[Row]
    arrived: float
    done: threading.Event = field(default_factory=threading.Event)
    outputs: list[RowOutput] | None = None
    error: BaseException | None = None

    @property
    def key(self) -> int:
        return self.rows[0].max_new_tokens

    @property
    def longest_prompt(self) -> int:
        return max(len(r.prompt_ids) for r in self.rows)

    def wait(self, timeout_s: float | None = None) -> list[RowOutput]:
        """The outputs, in row order.

        Raises:
            TimeoutError: not run within `timeout_s`.
            BaseException: whatever stopped the batch.
        """
        if not self.done.wait(timeout_s):
            raise TimeoutError(f"not answered within {timeout_s} s")
        if self.error is not None:
            raise self.error
        assert self.outputs is not None
        return self.outputs


class Batcher:
    """Batches of queued requests, run by one worker thread (`start` / `stop`)."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_rows: int,
        max_batch_tokens: int,
        max_wait_s: float,
        max_queue_rows: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.run_batch = run_batch
        self.max_rows = max_rows
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue_rows = max_queue_rows
        self.clock = clock
        self._queue: deque[Job] = deque()
        self._queued_rows = 0
        self._rows_by_key: dict[int, int] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.batches = 0
        self.failed_batches = 0
        self.rows_done = 0
        self.queue_wait_s = 0.0

    # -- lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the worker after its batch; requests still queued fail with `Stopped`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._cond:
            while self._queue:
                self._finish(self._queue.popleft(), error=Stopped("the server is stopping"))
            self._queued_rows = 0
            self._rows_by_key.clear()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the domain API

    def submit(self, rows: Sequence[Row]) -> Job:
        """Queues one request's rows (they run in one batch).

        Raises:
            ValueError: no rows, or more than fit one batch.
            Overloaded: the queue is full.
            Stopped: the batcher is stopping.
        """
        rows = list(rows)
        if not rows:
            raise ValueError("a request needs at least one row")
        job = Job(rows=rows, arrived=self.clock())
        if len(rows) > self.max_rows or self._tokens(len(rows), job) > self.max_batch_tokens:
            raise ValueError(
                f"{len(rows)} rows of up to {job.longest_prompt} + {job.key} tokens do not fit "
                f"one batch ({self.max_rows} rows, {self.max_batch_tokens} positions)"
            )
        with self._cond:
            if self._stopping:
                raise Stopped("the server is stopping")
            if self._queued_rows + len(rows) > self.max_queue_rows:
                raise Overloaded(f"{self._queued_rows} rows queued")
            self._queue.append(job)
            self._queued_rows += len(rows)
            self._rows_by_key[job.key] = self._rows_by_key.get(job.key, 0) + len(rows)
            self._cond.notify_all()
        return job

    def queued_rows(self) -> int:
        with self._cond:
            return self._queued_rows

    def stats(self) -> dict[str, Any]:
        with self._cond:
            queued_rows, queued_requests = self._queued_rows, len(self._queue)
        return {
            "batches": self.batches,
            "failed_batches": self.failed_batches,
            "rows": self.rows_done,
            "queued_rows": queued_rows,
            "queued_requests": queued_requests,
            "mean_queue_wait_ms": round(1000 * self.queue_wait_s / self.rows_done, 1)
            if self.rows_done
            else None,
            "worker_alive": self.alive,
        }

    # -- the worker

    @staticmethod
    def _tokens(rows: int, job: Job, longest: int = 0) -> int:
        return rows * (max(longest, job.longest_prompt) + job.key)

    def _take(self) -> list[Job]:
        """The next batch: jobs of the oldest job's `max_tokens`, in arrival order, within the
        row and position limits (the oldest job always). Called with the lock held."""
        first = self._queue[0]
        taken = [first]
        rows, longest = len(first.rows), first.longest_prompt
        for job in list(self._queue)[1:]:
            if job.key != first.key:
                continue
            grown = max(longest, job.longest_prompt)
            if (
                rows + len(job.rows) > self.max_rows
                or (rows + len(job.rows)) * (grown + first.key) > self.max_batch_tokens
            ):
                break
            taken.append(job)
            rows, longest = rows + len(job.rows), grown
        chosen = {id(job) for job in taken}
        self._queue = deque(job for job in self._queue if id(job) not in chosen)
        self._queued_rows -= rows
        self._rows_by_key[first.key] -= rows
        return taken

    def _ready(self) -> bool:
        """A batch should start now: a full batch waits, or the oldest has waited long enough."""
        first = self._queue[0]
        return (
            self._rows_by_key[first.key] >= self.max_rows
            or self.clock() - first.arrived >= self.max_wait_s
        )

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._queue:
                    self._cond.wait()
                if self._stopping:
                    return
                while not self._stopping and not self._ready():
                    left = self.max_wait_s - (self.clock() - self._queue[0].arrived)
                    self._cond.wait(max(left, 0.0005))
                if self._stopping:
                    return
                jobs = self._take()
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        rows = [row for job in jobs for row in job.rows]
        started = self.clock()
        try:
            outputs = self.run_batch(rows)
        except Exception as exc:  # the requests fail, the worker goes on
            logger.exception("a batch of %d rows failed", len(rows))
            self.failed_batches += 1
            for job in jobs:
                self._finish(job, error=exc)
            return
        self.batches += 1
        self.rows_done += len(rows)
        self.queue_wait_s += sum((started - job.arrived) * len(job.rows) for job in jobs)
        at = 0
        for job in jobs:
            self._finish(job, outputs=outputs[at : at + len(job.rows)])
            at += len(job.rows)

    @staticmethod
    def _finish(
        job: Job, *, outputs: list[RowOutput] | None = None, error: BaseException | None = None
    ) -> None:
        job.outputs, job.error = outputs, error
        job.done.set()
