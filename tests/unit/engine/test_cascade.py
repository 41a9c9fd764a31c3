"""The cascade's plain parts: which leaders go on to the next stage (capped, ties to the lower
index) and how they are cut into budget-sized batches. The rank loop itself runs through
ScoringRuntime in test_runtime.py."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.cascade import batched_stages, budgeted_chunks, describe, leaders
from service.engine.scorer import RefiningScorer
from service.engine.types import EncodedPair


class Named:
    def __init__(self, name: str) -> None:
        self.name = name
        self.input_names = ("input_ids",)
        self.pad_token_id = 0

    def infer(self, _feeds: object) -> np.ndarray:
        raise AssertionError("not run here")

    def warmup(self) -> None:
        pass


def pair(length: int) -> EncodedPair:
    return EncodedPair(np.arange(length, dtype=np.int64), None, False)


def test_leaders_are_the_near_ties_capped_to_the_highest() -> None:
    stage = RefiningScorer(Named("fast"), Named("exact"), margin=0.1)
    scores = np.array([0.50, 0.95, 0.97, 0.30, 0.96, 0.97, 0.90], dtype=np.float32)
    assert leaders(stage, scores, most=16).tolist() == [1, 2, 4, 5, 6]
    # Capped at three: the highest, the tie at 0.97 kept in index order, then 0.96.
    assert leaders(stage, scores, most=3).tolist() == [2, 4, 5]
    assert leaders(stage, scores, most=1).tolist() == [2]  # of two equal bests, the lower index
    assert leaders(stage, np.array([0.9, 0.1], dtype=np.float32), most=16).size == 0


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
