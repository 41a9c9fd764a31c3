"""The ranking cascade: the stages a candidate set goes through, their description for /info, and
the rank loop.

A scorer is a chain of stages (`Scorer.refinement`): a fast one (OpenVINO bf16, or int8 then
bf16) whose near-tied leaders are re-scored by the next, more precise one, down to the exact
engine (fp32). Every stage but the exact one runs behind its own batcher (so a re-scoring stage
batches across requests); the exact one runs its few pairs in turns on the last batcher's
workers. Stages get the pairs already encoded: nothing is tokenized twice. Work per request is
bounded: at most `max_rescored` candidates go on to each later stage, in batches within the
batch budget, each checked against the request's deadline.

The ranking rule. Callers rank a set by its scores, ties to the lowest index, so the scores of
one set must compare like with like:

- Candidates whose encodings are identical (the same token ids after truncation, whatever their
  texts) are scored once and share the score: they tie exactly, and the lowest index wins.
- A stage re-scores the set's near-ties (the candidates within its margin of the best, by the
  previous stage's scores) only when it can re-score all of them: at most `max_rescored`. Every
  near-tie then carries the precise score and is compared with the others in it. Candidates
  beyond the margin keep the previous stage's score: the margin (the largest fast/exact
  difference measured at warm-up on synthetic batches and the probe sets' text, or the export's
  recorded int8 error) keeps them below the precise stage's best.
- With more near-ties than `max_rescored`, the set keeps the previous stage's scores and the
  cascade stops there: its near-ties are ranked in that one precision. Re-scoring only some of
  them would rank precise scores against fast ones, and a systematic offset between the two
  (bf16 reading above fp32) would carry every near-tie left out past every re-scored one.

`leaders` and `budgeted_chunks` are plain functions, so that the in-process engine benchmark
re-scores exactly as the service does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from service import metrics
from service.engine.batcher import DynamicBatcher, ScoredPair
from service.engine.errors import DeadlineExceeded
from service.engine.types import EncodedPair, Refinement, Scorer, pad_batch, padded_width


def batched_stages(scorer: Scorer) -> list[Scorer]:
    """The stages that run behind a batcher: the scorer itself and, down a refining chain, each
    exact scorer that refines further (int8 -> [bf16 -> fp32]); the last exact one is unbatched."""
    stages = [scorer]
    while (step := stages[-1].refinement()) is not None and step.exact.refinement() is not None:
        stages.append(step.exact)
    return stages


def describe(scorer: Scorer) -> list[dict[str, Any]]:
    """The stages in order, each with the margin within which it passes candidates on."""
    stages: list[dict[str, Any]] = []
    stage = scorer
    while (step := stage.refinement()) is not None:
        stages.append({"engine": step.fast.name, "rescore_margin": step.margin})
        stage = step.exact
    return [*stages, {"engine": stage.name}]


def leaders(step: Refinement, scores: np.ndarray, most: int) -> np.ndarray:
    """Indices (ascending) of the candidates `step` re-scores: its near-ties (those within its
    margin of the best), when there are at most `most` of them; none otherwise, and none when
    the best is clear (the module's ranking rule)."""
    close = step.near_top(scores)
    return close if close.size <= most else np.empty(0, dtype=np.int64)


def distinct(encoded: Sequence[EncodedPair]) -> tuple[list[EncodedPair], list[int]]:
    """The distinct encodings of `encoded` (first occurrences, in order) and, per pair, the index
    of its encoding among them: pairs whose token ids are the same are scored once."""
    slot_of: dict[tuple[bytes, bytes | None], int] = {}
    unique: list[EncodedPair] = []
    slots = []
    for pair in encoded:
        types = None if pair.token_type_ids is None else pair.token_type_ids.tobytes()
        slot = slot_of.setdefault((pair.input_ids.tobytes(), types), len(unique))
        if slot == len(unique):
            unique.append(pair)
        slots.append(slot)
    return unique, slots


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
        max_rescored: most near-ties of one set a later stage re-scores; a set with more
            keeps the previous stage's scores (the module's ranking rule).
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
        """Scores one candidate set by the module's ranking rule: each distinct encoding once, by
        the first stage, then each stage's near-ties by the next while there are at most
        `max_rescored` of them; a pair keeps the score of the last stage that scored it.

        Raises:
            DeadlineExceeded: the deadline passed, in any stage.
            and whatever `DynamicBatcher.score_encoded` raises.
        """
        unique, slots = distinct(encoded)
        results = await self.batchers[0].score_encoded(unique, deadline=deadline)
        scores = [r.score for r in results]
        stage = self.scorer
        rows = np.arange(len(unique))
        for batcher in [*self.batchers[1:], None]:
            step = stage.refinement()
            if step is None or rows.size < 2:
                break
            chosen = leaders(
                step, np.array([scores[i] for i in rows], dtype=np.float32), self.max_rescored
            )
            if not chosen.size:
                break
            rows = rows[chosen]
            subset = [unique[i] for i in rows]
            if batcher is not None:  # a batched stage (bf16 after int8): across requests
                rescored = [r.score for r in await batcher.score_encoded(subset, deadline=deadline)]
            else:
                rescored = await self._score_exact(step.exact, subset, deadline)
            metrics.PAIRS_RESCORED.labels(precision=step.exact.precision).inc(len(rows))
            for row, score in zip(rows, rescored, strict=True):
                scores[row] = float(score)
            stage = step.exact
        # A pair's own truncation flag: a pair cut to the same tokens as one that fits is still cut.
        return [
            ScoredPair(scores[slot], pair.truncated, pair.length)
            for pair, slot in zip(encoded, slots, strict=True)
        ]

    async def _score_exact(
        self, exact: Scorer, encoded: Sequence[EncodedPair], deadline: float | None
    ) -> list[float]:
        """The exact engine on near-tied leaders, on the last batcher's workers in turn with its
        batches (beside the streams it oversubscribed the cores and cost twice the CPU): cut
        across the idle streams as the batcher cuts a lone request (`idle_parts`), the parts run
        at once, each in batches within the budget, the deadline checked before each batch."""
        batcher = self.batchers[-1]
        parts = batcher.idle_parts(len(encoded), sum(e.length for e in encoded))
        # Neighbours in length share a part, so that each pads little.
        order = sorted(range(len(encoded)), key=lambda i: encoded[i].length)
        size = -(-len(order) // parts)
        groups = [order[start : start + size] for start in range(0, len(order), size)]
        scores = [0.0] * len(encoded)
        done = [0]

        async def run(rows: list[int]) -> None:
            multiple = batcher.config.pad_to_multiple
            chunks = budgeted_chunks(
                [encoded[i] for i in rows],
                batcher.max_batch_tokens,
                batcher.max_batch_size,
                multiple,
                self.max_length,
            )
            offset = 0
            for chunk in chunks:
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineExceeded()
                width = padded_width(max(e.length for e in chunk), multiple, self.max_length)
                feeds = pad_batch(chunk, exact.pad_token_id, exact.input_names, width)
                values = await batcher.run_on_workers(exact.infer, feeds)
                for row, value in zip(
                    rows[offset : offset + len(chunk)], np.asarray(values).reshape(-1), strict=True
                ):
                    scores[row] = float(value)
                offset += len(chunk)
                done[0] += len(chunk)

        tasks = [asyncio.ensure_future(run(rows)) for rows in groups]
        try:
            await asyncio.gather(*tasks)
        except BaseException as exc:
            for task in tasks:  # a failed part stops the others
                task.cancel()
            if isinstance(exc, DeadlineExceeded):
                metrics.PAIRS_DROPPED.labels(reason="deadline").inc(len(encoded) - done[0])
            raise
        return scores
