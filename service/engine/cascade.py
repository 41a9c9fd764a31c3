"""The ranking cascade: the stages a candidate set goes through, their description for /info, and
the rank loop.

A scorer is a chain of stages: a fast one (OpenVINO bf16, or int8 then bf16) whose near-tied
leaders are re-scored by the next, more precise one, down to the exact engine (fp32). Every stage
but the exact one runs behind its own batcher (so a re-scoring stage batches across requests);
the exact one runs its few pairs in turns on the last batcher's workers. Stages get the pairs
already encoded: nothing is tokenized twice. Work per request is bounded: at most
`max_rescored` leaders go on to each later stage, in batches within the batch budget, each
checked against the request's deadline.

`leaders` and `budgeted_chunks` are plain functions, so that the in-process engine benchmark
re-scores exactly as the service does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from service import metrics
from service.engine.batcher import DynamicBatcher, ScoredPair
from service.engine.errors import DeadlineExceeded
from service.engine.scorer import RefiningScorer
from service.engine.types import EncodedPair, Scorer, pad_batch, padded_width


def batched_stages(scorer: Scorer) -> list[Scorer]:
    """The stages that run behind a batcher: the scorer itself and, down a refining chain, each
    exact scorer that refines further (int8 -> [bf16 -> fp32]); the last exact one is unbatched."""
    stages = [scorer]
    while isinstance(stages[-1], RefiningScorer) and isinstance(stages[-1].exact, RefiningScorer):
        stages.append(stages[-1].exact)
    return stages


def describe(scorer: Scorer) -> list[dict[str, Any]]:
    """The stages in order, each with the margin within which it passes candidates on."""
    stages: list[dict[str, Any]] = []
    stage: Scorer = scorer
    while isinstance(stage, RefiningScorer):
        stages.append({"engine": stage.fast.name, "rescore_margin": stage.margin})
        stage = stage.exact
    return [*stages, {"engine": stage.name}]


def precision_of(scorer: Scorer) -> str:
    fast = scorer.fast if isinstance(scorer, RefiningScorer) else scorer
    return str(getattr(fast, "precision", "unknown"))


def leaders(stage: RefiningScorer, scores: np.ndarray, most: int) -> np.ndarray:
    """Indices (ascending) of the candidates `stage` passes on: those within its margin of the
    best, at most `most` of the highest (a stable sort keeps the lower index on ties)."""
    close = stage.near_top(scores)
    if close.size > most:
        order = np.argsort(-np.asarray(scores)[close], kind="stable")
        close = np.sort(close[order[:most]])
    return close


def budgeted_chunks(
    encoded: Sequence[EncodedPair],
    max_tokens: int,
    max_rows: int,
    multiple: int,
    max_length: int | None,
) -> list[list[EncodedPair]]:
    """`encoded` in order, cut into batches whose padded size (rows x stepped width) stays
    within `max_tokens` and `max_rows`; a pair longer than the budget goes alone."""
    chunks: list[list[EncodedPair]] = []
    current: list[EncodedPair] = []
    width = 0
    for pair in encoded:
        new_width = max(width, padded_width(pair.length, multiple, max_length))
        if current and ((len(current) + 1) * new_width > max_tokens or len(current) >= max_rows):
            chunks.append(current)
            current, new_width = [], padded_width(pair.length, multiple, max_length)
        current.append(pair)
        width = new_width
    if current:
        chunks.append(current)
    return chunks


class Cascade:
    """Ranks encoded candidate sets through a scorer's stages.

    Args:
        scorer: the (possibly refining) scorer.
        batchers: one per `batched_stages(scorer)`, in order, started by the caller.
        max_rescored: most leaders of one set a later stage re-scores.
        max_length: the model's longest input (batch widths never pad past it).
    """

    def __init__(
        self,
        scorer: Scorer,
        batchers: Sequence[DynamicBatcher],
        *,
        max_rescored: int,
        max_length: int | None,
    ) -> None:
        if len(batchers) != len(batched_stages(scorer)):
            raise ValueError("one batcher per batched stage")
        self.scorer = scorer
        self.batchers = list(batchers)
        self.max_rescored = max_rescored
        self.max_length = max_length

    async def rank(
        self, encoded: Sequence[EncodedPair], *, deadline: float | None
    ) -> list[ScoredPair]:
        """Scores one candidate set: every pair by the first stage, then each stage's leaders by
        the next; a pair keeps the score of the last stage that scored it.

        Raises:
            DeadlineExceeded: the deadline passed, in any stage.
            and whatever `DynamicBatcher.score_encoded` raises.
        """
        results = await self.batchers[0].score_encoded(encoded, deadline=deadline)
        stage = self.scorer
        rows = np.arange(len(results))
        for batcher in [*self.batchers[1:], None]:
            if not isinstance(stage, RefiningScorer) or rows.size < 2:
                break
            fast = np.array([results[i].score for i in rows], dtype=np.float32)
            chosen = leaders(stage, fast, self.max_rescored)
            if not chosen.size:
                break
            rows = rows[chosen]
            subset = [encoded[i] for i in rows]
            if batcher is not None:  # a batched stage (bf16 after int8): across requests
                scored = await batcher.score_encoded(subset, deadline=deadline)
                scores = [r.score for r in scored]
            else:
                scores = await self._score_exact(stage, subset, deadline)
            metrics.PAIRS_RESCORED.labels(precision=precision_of(stage.exact)).inc(len(rows))
            results = list(results)
            for row, score in zip(rows, scores, strict=True):
                results[row] = replace(results[row], score=float(score))
            stage = stage.exact
        return results

    async def _score_exact(
        self, stage: RefiningScorer, encoded: Sequence[EncodedPair], deadline: float | None
    ) -> list[float]:
        """The exact engine on near-tied leaders, in batches within the last batcher's budget,
        each in its turn on that batcher's workers (beside the streams it oversubscribed the
        cores and cost twice the CPU), the deadline checked before each."""
        batcher = self.batchers[-1]
        multiple = batcher.config.pad_to_multiple
        scores: list[float] = []
        for chunk in budgeted_chunks(
            encoded, batcher.max_batch_tokens, batcher.max_batch_size, multiple, self.max_length
        ):
            if deadline is not None and time.monotonic() >= deadline:
                metrics.PAIRS_DROPPED.labels(reason="deadline").inc(len(encoded) - len(scores))
                raise DeadlineExceeded()
            width = padded_width(max(e.length for e in chunk), multiple, self.max_length)
            feeds = pad_batch(chunk, stage.pad_token_id, stage.input_names, width)
            exact = await batcher.run_on_workers(stage.exact.infer, feeds)
            scores.extend(float(v) for v in np.asarray(exact).reshape(-1))
        return scores
