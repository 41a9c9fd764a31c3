"""The cascade: which leaders go on to the next stage (all the near-ties, or none past the cap),
identical encodings scored once, the stages and their description, and the ranking rule driven
through `Cascade.rank` with fake stages whose scores disagree. The runtime around it (tokenizing,
the chain's batchers, budgets and deadlines) is in test_runtime.py."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np
import pytest

from service.engine.batcher import DynamicBatcher
from service.engine.batching_config import BatcherConfig
from service.engine.cascade import (
    Cascade,
    batched_stages,
    budgeted_chunks,
    describe,
    distinct,
    leaders,
)
from service.engine.scorer import RefiningScorer
from service.engine.types import EncodedPair, Refinement, Scorer


class Named(Scorer):
    input_names = ("input_ids",)
    pad_token_id = 0
    device = "cpu"
    parallelism = 1

    def __init__(self, name: str) -> None:
        self.name = name
        self.precision = name

    def infer(self, _feeds: object) -> np.ndarray:
        raise AssertionError("not run here")

    def warmup(self, stop: threading.Event | None = None) -> None:
        pass


class TableScorer(Named):
    """Scores a row by its second token id, `k`, as `table[k]`; counts the rows it scored."""

    input_names = ("input_ids", "attention_mask")

    def __init__(self, name: str, table: Mapping[int, float]) -> None:
        super().__init__(name)
        self.table = dict(table)
        self.rows = 0

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        self.rows += len(feeds["input_ids"])
        return np.array([self.table[int(k)] for k in feeds["input_ids"][:, 1]], dtype=np.float32)


def pair(length: int) -> EncodedPair:
    return EncodedPair(np.arange(length, dtype=np.int64), None, False)


def candidate(k: int, truncated: bool = False) -> EncodedPair:
    """An encoding whose second token is `k` (the key of the table scorers)."""
    return EncodedPair(np.array([0, k, 2], dtype=np.int64), None, truncated)


def test_leaders_are_all_the_near_ties_or_none_past_the_cap() -> None:
    step = Refinement(Named("fast"), Named("exact"), margin=0.1)
    scores = np.array([0.50, 0.95, 0.97, 0.30, 0.96, 0.97, 0.90], dtype=np.float32)
    assert leaders(step, scores, most=16).tolist() == [1, 2, 4, 5, 6]
    assert leaders(step, scores, most=5).tolist() == [1, 2, 4, 5, 6]
    # More near-ties than the cap: none re-scored (re-scoring some would mix precisions).
    assert leaders(step, scores, most=4).size == 0
    assert leaders(step, np.array([0.9, 0.1], dtype=np.float32), most=16).size == 0


def test_identical_encodings_are_one_candidate() -> None:
    typed = EncodedPair(np.array([0, 7, 2]), np.array([0, 0, 1]), False)
    encoded = [candidate(7), candidate(8), candidate(7, truncated=True), typed, candidate(8)]
    unique, slots = distinct(encoded)
    assert slots == [0, 1, 0, 2, 1]
    assert unique == [encoded[0], encoded[1], typed]  # other segment ids: another input


@pytest.mark.parametrize("multiple", [1, 8])
def test_budgeted_chunks_keep_order_and_the_budget(multiple: int) -> None:
    lengths = [5, 30, 12, 60, 7, 200, 9, 9, 9, 9]
    encoded = [pair(n) for n in lengths]
    chunks = budgeted_chunks(encoded, max_tokens=128, max_rows=3, multiple=multiple, max_length=512)
    assert [p.length for chunk in chunks for p in chunk] == lengths  # every pair, in order
    for chunk in chunks:
        width = max(-(-p.length // multiple) * multiple for p in chunk)
        assert len(chunk) <= 3
        assert len(chunk) * width <= 128 or len(chunk) == 1  # over budget only alone
    assert any(len(chunk) == 1 and chunk[0].length == 200 for chunk in chunks)


def test_stages_and_their_description() -> None:
    int8, bf16, fp32 = Named("int8"), Named("bf16"), Named("fp32")
    inner = RefiningScorer(bf16, fp32, margin=0.01)
    chain = RefiningScorer(int8, inner, margin=0.1)
    assert batched_stages(chain) == [chain, inner]  # the exact fp32 runs unbatched
    assert describe(chain) == [
        {"engine": "int8", "rescore_margin": 0.1},
        {"engine": "bf16", "rescore_margin": 0.01},
        {"engine": "fp32"},
    ]
    assert batched_stages(fp32) == [fp32] and describe(fp32) == [{"engine": "fp32"}]
    assert (chain.precision, inner.precision) == ("int8", "bf16")  # the fast stage's


# The rule, with a fast stage that reads 0.1 above the exact one and orders the near-ties the
# other way: 20 near-ties (keys 0-19: fast 0.500 + k/1000, exact 0.419 - k/1000) and one far
# candidate (key 20).
NEAR = range(20)
FAST = {**{k: 0.500 + k / 1000 for k in NEAR}, 20: 0.1}
EXACT = {**{k: 0.419 - k / 1000 for k in NEAR}, 20: 0.3}


async def rank(
    encoded: list[EncodedPair], max_rescored: int
) -> tuple[list[float], TableScorer, TableScorer]:
    fast, exact = TableScorer("bf16", FAST), TableScorer("fp32", EXACT)
    scorer = RefiningScorer(fast, exact, margin=0.05)
    batcher = DynamicBatcher(scorer, lambda _pairs: [], BatcherConfig(max_wait_ms=0))
    await batcher.start()
    try:
        cascade = Cascade(scorer, [batcher], max_rescored=max_rescored, max_length=None)
        results = await cascade.rank(encoded, deadline=None)
    finally:
        await batcher.stop()
    assert [r.tokens for r in results] == [p.length for p in encoded]
    return [r.score for r in results], fast, exact


def winner(scores: list[float]) -> int:
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def approx(table: Mapping[int, float], keys: list[int]) -> list[float]:
    return pytest.approx([table[k] for k in keys], abs=1e-6)


async def test_near_ties_past_the_cap_keep_one_precision() -> None:
    keys = [*NEAR, 20]
    scores, fast, exact = await rank([candidate(k) for k in keys], max_rescored=16)
    # Not the top 16 in fp32 beside 4 in bf16 (one of those 4 would win: bf16 reads higher).
    assert exact.rows == 0
    assert scores == approx(FAST, keys)
    assert winner(scores) == 19


async def test_near_ties_within_the_cap_are_all_compared_in_the_precise_stage() -> None:
    keys = [*NEAR, 20]
    scores, fast, exact = await rank([candidate(k) for k in keys], max_rescored=20)
    assert (fast.rows, exact.rows) == (21, 20)
    assert scores[:20] == approx(EXACT, list(NEAR))
    assert scores[20] == pytest.approx(FAST[20])  # beyond the margin: the fast score
    assert winner(scores) == 0


async def test_twins_are_scored_once_tie_exactly_and_the_lowest_index_wins() -> None:
    # 50 different texts cut to the same tokens, after two other candidates: three near-ties
    # (the cap counts the twins once), all re-scored.
    encoded = [candidate(3), candidate(2), *[candidate(0, truncated=True)] * 50]
    scores, fast, exact = await rank(encoded, max_rescored=3)
    assert (fast.rows, exact.rows) == (3, 3)
    assert scores[2:] == [scores[2]] * 50
    assert scores == approx(EXACT, [3, 2, *[0] * 50])
    assert winner(scores) == 2


class TwoStreamTable(TableScorer):
    """A table scorer with two streams whose exact calls meet at a barrier: they pass it only
    when two run at once."""

    parallelism = 2

    def __init__(self, name: str, table: Mapping[int, float], barrier: bool) -> None:
        super().__init__(name, table)
        self.barrier = threading.Barrier(2, timeout=10) if barrier else None
        self.batches: list[list[int]] = []

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        self.batches.append([int(k) for k in feeds["input_ids"][:, 1]])
        if self.barrier is not None:
            self.barrier.wait()
        return super().infer(feeds)


def long_candidate(k: int) -> EncodedPair:
    """`candidate(k)` padded out to 40 + k tokens: enough work to split across streams."""
    return EncodedPair(np.array([0, k, *[5] * (38 + k)], dtype=np.int64), None, False)


async def test_a_lone_sets_near_ties_are_re_scored_on_every_idle_stream() -> None:
    fast = TwoStreamTable("bf16", FAST, barrier=False)
    exact = TwoStreamTable("fp32", EXACT, barrier=True)
    scorer = RefiningScorer(fast, exact, margin=0.05)
    batcher = DynamicBatcher(scorer, lambda _pairs: [], BatcherConfig(max_wait_ms=0))
    await batcher.start()
    try:
        cascade = Cascade(scorer, [batcher], max_rescored=20, max_length=None)
        keys = [*NEAR, 20]
        results = await cascade.rank([long_candidate(k) for k in keys], deadline=None)
    finally:
        await batcher.stop()
    # Both parts passed the barrier together: the two streams re-scored at once, 10 rows each,
    # neighbours in length together; every score back in its candidate's place.
    assert sorted(sorted(batch) for batch in exact.batches) == [
        list(range(10)),
        list(range(10, 20)),
    ]
    scores = [r.score for r in results]
    assert scores[:20] == approx(EXACT, list(NEAR))
    assert winner(scores) == 0
