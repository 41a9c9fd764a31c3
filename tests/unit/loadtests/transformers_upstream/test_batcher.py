"""The batcher with a counting stand-in for the model: what forms one batch, what splits them,
and how errors and stopping reach the waiting requests. Requests are queued before the worker
starts, so what it takes does not depend on timing."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from loadtests.transformers_upstream.batcher import Batcher, Overloaded, Stopped
from loadtests.transformers_upstream.engine import Row, RowOutput
from loadtests.transformers_upstream.sampling import SamplingParams


class Model:
    """Answers each row with its prompt reversed; records every batch."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[Row]] = []
        self.fail = fail

    def __call__(self, rows: Sequence[Row]) -> list[RowOutput]:
        self.batches.append(list(rows))
        if self.fail:
            raise RuntimeError("device lost")
        return [
            RowOutput(list(reversed(r.prompt_ids)), [-1.0] * len(r.prompt_ids), "length")
            for r in rows
        ]


def _row(prompt: Sequence[int], max_new: int = 4) -> Row:
    return Row(list(prompt), SamplingParams(seed=0), max_new)


def _batcher(model: Model, **limits: float) -> Batcher:
    options = {"max_rows": 8, "max_batch_tokens": 10_000, "max_wait_s": 0.0, **limits}
    return Batcher(
        model,
        max_rows=int(options["max_rows"]),
        max_batch_tokens=int(options["max_batch_tokens"]),
        max_wait_s=options["max_wait_s"],
    )


def test_queued_requests_run_as_one_batch_and_each_gets_its_own_rows() -> None:
    model = Model()
    batcher = _batcher(model)
    jobs = [batcher.submit([_row([i, i + 1])]) for i in range(5)]
    jobs.append(batcher.submit([_row([7]), _row([8, 9])]))  # one request, two choices
    assert batcher.queued_rows() == 7
    batcher.start()
    try:
        assert [job.wait(30)[0].token_ids for job in jobs[:5]] == [[i + 1, i] for i in range(5)]
        assert [o.token_ids for o in jobs[5].wait(30)] == [[7], [9, 8]]
    finally:
        batcher.stop()
    assert len(model.batches) == 1 and len(model.batches[0]) == 7
    assert batcher.stats()["batches"] == 1 and batcher.stats()["rows"] == 7


def test_batches_hold_one_max_tokens_and_keep_to_the_row_and_position_limits() -> None:
    model = Model()
    batcher = _batcher(model, max_rows=3, max_batch_tokens=40)
    jobs = [
        batcher.submit([_row([1], max_new=4)]),
        batcher.submit([_row([2], max_new=8)]),  # another budget: another batch
        batcher.submit([_row([3], max_new=4)]),
        batcher.submit([_row([4], max_new=4)]),
        batcher.submit([_row([5], max_new=4)]),  # a fourth row of budget 4: the next batch
        batcher.submit([_row([1] * 16, max_new=4)]),  # 20 positions: alone within 40
    ]
    batcher.start()
    try:
        for job in jobs:
            job.wait(30)
    finally:
        batcher.stop()
    shapes = [[(len(r.prompt_ids), r.max_new_tokens) for r in b] for b in model.batches]
    assert shapes[0] == [(1, 4), (1, 4), (1, 4)]
    assert [(1, 8)] in shapes
    assert sum(len(b) for b in model.batches) == 6
    for batch in model.batches:
        longest = max(len(r.prompt_ids) for r in batch)
        assert len(batch) <= 3 and len(batch) * (longest + batch[0].max_new_tokens) <= 40
        assert len({r.max_new_tokens for r in batch}) == 1


def test_a_failed_batch_fails_its_requests_and_the_worker_goes_on() -> None:
    model = Model(fail=True)
    batcher = _batcher(model)
    job = batcher.submit([_row([1])])
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            job.wait(30)
        model.fail = False
        assert batcher.submit([_row([2, 3])]).wait(30)[0].token_ids == [3, 2]
        assert batcher.alive and batcher.stats()["failed_batches"] == 1
    finally:
        batcher.stop()


def test_limits_are_refused_up_front() -> None:
    batcher = Batcher(Model(), max_rows=2, max_batch_tokens=20, max_wait_s=0, max_queue_rows=3)
    with pytest.raises(ValueError, match="do not fit one batch"):
        batcher.submit([_row([1])] * 3)
    with pytest.raises(ValueError, match="do not fit one batch"):
        batcher.submit([_row([1] * 30)])
    batcher.submit([_row([1])] * 2)
    with pytest.raises(Overloaded):
        batcher.submit([_row([1])] * 2)


def test_stop_fails_what_is_still_queued() -> None:
    batcher = _batcher(Model())
    job = batcher.submit([_row([1])])
    batcher.stop()
    with pytest.raises(Stopped):
        job.wait(5)
    with pytest.raises(Stopped):
        batcher.submit([_row([1])])
