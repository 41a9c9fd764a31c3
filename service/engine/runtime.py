"""The scoring runtime: one export directory loaded into a tokenizer, a scorer and the dynamic
batcher, with an explicit lifecycle (load and warm up, then serve; drain, then stop)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from service import metrics
from service.engine.batcher import BatcherConfig, DynamicBatcher, ScoredPair
from service.engine.errors import DeadlineExceeded
from service.engine.export_dir import ExportDir
from service.engine.scorer import Device, Engine, Precision, RefiningScorer, load_scorer
from service.engine.tokenize import PairTokenizer
from service.engine.types import EncodedPair, Scorer, pad_batch, padded_width

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeConfig:
    export_dir: Path
    device: Device = "auto"
    engine: Engine = "auto"
    precision: Precision = "auto"
    threads: int | None = None
    streams: int | None = None
    tensorrt: bool = False
    # Where TensorRT keeps the engines it builds (one per shape profile) between starts.
    trt_cache: Path | None = None
    # Most near-tied leaders of one request a later ranking stage re-scores: bounds the work
    # (and memory) any one request can buy, whatever its candidates.
    max_rescored: int = 16
    # Serve graphs that did not pass a parity gate (an export made with --parity record).
    allow_ungated: bool = False
    batcher: BatcherConfig = field(default_factory=BatcherConfig)


class ScoringRuntime:
    """Loads the model off the event loop; `ready` turns true only after warm-up.

    Args:
        config: what to load and how to serve it.
        prepare: called first, off the event loop, when `config.export_dir` must be produced
            (exporting a checkpoint or hub id): it returns the export directory to load.

    `phase` says where it stands: "exporting", "loading", "ready", "failed" or "stopped".
    """

    def __init__(self, config: RuntimeConfig, prepare: Callable[[], Path] | None = None) -> None:
        self.config = config
        self._prepare = prepare
        self.phase = "exporting" if prepare is not None else "loading"
        self.export: ExportDir | None = None
        self.tokenizer: PairTokenizer | None = None
        self.scorer: Scorer | None = None
        # One batcher per batched stage of the scorer (see `_stages`); `batcher` is the one
        # /score uses, the most precise batched stage.
        self.batchers: list[DynamicBatcher] = []
        self.batcher: DynamicBatcher | None = None
        self.load_error: str | None = None
        self.load_seconds: float | None = None

    @property
    def ready(self) -> bool:
        return self.phase == "ready" and self.alive

    @property
    def alive(self) -> bool:
        """Whether every batcher is running (False before start)."""
        return bool(self.batchers) and all(b.alive for b in self.batchers)

    @property
    def loading(self) -> bool:
        return self.phase in ("exporting", "loading")

    def _load_blocking(self) -> None:
        export_dir = self.config.export_dir
        if self._prepare is not None:  # phase is "exporting" since __init__
            export_dir = self._prepare()
        self.phase = "loading"
        started = time.perf_counter()
        export = ExportDir.load(export_dir, allow_ungated=self.config.allow_ungated)
        tokenizer = PairTokenizer.from_dir(
            export.path,
            max_length=export.max_length,
            with_token_type_ids="token_type_ids" in export.input_names,
        )
        config = self.config
        scorer = load_scorer(
            export,
            device=config.device,
            engine=config.engine,
            precision=config.precision,
            threads=config.threads,
            streams=config.streams,
            tensorrt=config.tensorrt,
            trt_cache=None if config.trt_cache is None else str(config.trt_cache),
        )
        scorer.warmup()
        self.export, self.tokenizer, self.scorer = export, tokenizer, scorer
        self.load_seconds = time.perf_counter() - started
        logger.info(
            "scorer %s loaded and warm in %.1f s (max_length %d)",
            scorer.name,
            self.load_seconds,
            export.max_length,
        )

    async def start(self) -> None:
        """Loads, warms up and starts the batcher; records a load failure instead of raising."""
        try:
            await asyncio.to_thread(self._load_blocking)
            assert self.scorer is not None and self.tokenizer is not None
            assert self.export is not None
            self.batchers = [
                DynamicBatcher(
                    stage, self.tokenizer.encode, self.config.batcher, self.export.max_length
                )
                for stage in _stages(self.scorer)
            ]
            self.batcher = self.batchers[-1]
            for batcher in self.batchers:
                await batcher.start()
            self.phase = "ready"
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.phase = "failed"
            logger.error("the scorer failed to load: %s", self.load_error)

    async def stop(self, timeout: float | None = None) -> None:
        """Finishes the work already accepted, then stops the batcher."""
        if self.phase != "failed":
            self.phase = "stopped"
        # First stage first: its drained requests may still queue leaders on the next stage.
        for batcher in self.batchers:
            await batcher.stop(drain=True, timeout=timeout)

    async def score(
        self, pairs: Sequence[tuple[str, str]], *, deadline: float | None = None
    ) -> list[ScoredPair]:
        assert self.batcher is not None
        return await self.batcher.score(pairs, deadline=deadline)

    async def rank(
        self, instruction: str, candidates: Sequence[str], *, deadline: float | None = None
    ) -> list[ScoredPair]:
        """Scores candidates for one instruction, for ranking them.

        Identical candidates are scored once and share the result (so exact ties keep the lowest
        index when ranked). With a refining scorer, every distinct candidate is scored by the
        first stage and those within that stage's margin of the best, at most
        `config.max_rescored` of the highest, are re-scored by the next one (int8 -> bf16 -> fp32
        on CPU when the export has the int8 model, else bf16 -> fp32): the winner and the order
        of the leaders are those of fp32; a candidate keeps the score of the last stage that
        scored it. Every stage goes through the batch budget and the request's deadline.

        Raises:
            DeadlineExceeded: the deadline passed, in any stage.
            and whatever `DynamicBatcher.score` raises.
        """
        assert self.batchers, "rank() before start()"
        if deadline is None and self.config.batcher.default_timeout_s is not None:
            deadline = time.monotonic() + self.config.batcher.default_timeout_s
        slot_of: dict[str, int] = {}
        slots = [slot_of.setdefault(text, len(slot_of)) for text in candidates]
        pairs = [(instruction, text) for text in slot_of]
        results = await self.batchers[0].score(pairs, deadline=deadline)
        stage = self.scorer
        rows = np.arange(len(results))
        for batcher in [*self.batchers[1:], None]:
            if not isinstance(stage, RefiningScorer) or rows.size < 2:
                break
            fast = np.array([results[i].score for i in rows], dtype=np.float32)
            leaders = stage.near_top(fast)
            if not leaders.size:
                break
            if leaders.size > self.config.max_rescored:
                # The highest first stage scores; a stable sort keeps the lower index on ties.
                order = np.argsort(-fast[leaders], kind="stable")
                leaders = np.sort(leaders[order[: self.config.max_rescored]])
            rows = rows[leaders]
            subset = [pairs[i] for i in rows]
            if batcher is not None:  # a batched stage (bf16 after int8): across requests
                scores = [r.score for r in await batcher.score(subset, deadline=deadline)]
            else:  # the exact (fp32) stage: on the last batcher's workers, in budget-sized turns
                scores = await self._score_exact(stage, subset, deadline)
            metrics.PAIRS_RESCORED.labels(precision=_precision(stage.exact)).inc(len(rows))
            results = list(results)
            for row, score in zip(rows, scores, strict=True):
                results[row] = replace(results[row], score=float(score))
            stage = stage.exact
        return [results[slot] for slot in slots]

    async def _score_exact(
        self, stage: RefiningScorer, pairs: Sequence[tuple[str, str]], deadline: float | None
    ) -> list[float]:
        """Scores near-tied leaders with the exact engine, in batches within the last batcher's
        token budget, each taking its turn on that batcher's workers: beside the streams it
        oversubscribed the cores and cost twice the CPU. Checks the deadline before each batch.
        """
        tokenizer = self.tokenizer
        batcher = self.batchers[-1]
        assert tokenizer is not None
        encoded = tokenizer.encode(pairs)
        multiple = self.config.batcher.pad_to_multiple
        max_length = self.export.max_length if self.export is not None else None
        scores: list[float] = []
        for chunk in _budgeted_chunks(
            encoded, batcher.max_batch_tokens, batcher.max_batch_size, multiple, max_length
        ):
            if deadline is not None and time.monotonic() >= deadline:
                metrics.PAIRS_DROPPED.labels(reason="deadline").inc(len(pairs) - len(scores))
                raise DeadlineExceeded()
            width = padded_width(max(e.length for e in chunk), multiple, max_length)
            feeds = pad_batch(chunk, stage.pad_token_id, stage.input_names, width)
            exact = await batcher.run_on_workers(stage.exact.infer, feeds)
            scores.extend(float(v) for v in np.asarray(exact).reshape(-1))
        return scores

    def describe(self) -> dict[str, Any]:
        scorer = self.scorer
        batcher = self.batcher
        tolerance = batcher.padding_tolerance if batcher is not None else None
        backend = scorer.fast if isinstance(scorer, RefiningScorer) else scorer
        describe_backend = getattr(backend, "describe", None)
        return {
            "engine": getattr(scorer, "name", None),
            # Ranking runs these in order, each re-scoring the previous one's near-ties (within
            # its margin); /score uses the last batched one (all but an unbatched fp32 stage).
            "stages": _describe_stages(scorer) if scorer is not None else [],
            "device": getattr(scorer, "device", None),
            "precision": getattr(scorer, "precision", None),
            "streams": getattr(scorer, "parallelism", 1) if scorer is not None else None,
            # null when unlimited (JSON has no infinity)
            "padding_tolerance": tolerance
            if tolerance is None or math.isfinite(tolerance)
            else None,
            "pad_to_multiple": self.config.batcher.pad_to_multiple,
            # The batch limits in force (unset settings resolved for the device).
            "max_batch_tokens": batcher.max_batch_tokens if batcher is not None else None,
            "max_batch_size": batcher.max_batch_size if batcher is not None else None,
            # ONNX Runtime: execution providers (TensorRT, CUDA, CPU), sessions, IO binding.
            "backend": describe_backend() if callable(describe_backend) else None,
            "load_seconds": None if self.load_seconds is None else round(self.load_seconds, 2),
        }


def _describe_stages(scorer: Scorer) -> list[dict[str, Any]]:
    stages: list[dict[str, Any]] = []
    stage: Scorer = scorer
    while isinstance(stage, RefiningScorer):
        stages.append({"engine": stage.fast.name, "rescore_margin": stage.margin})
        stage = stage.exact
    return [*stages, {"engine": stage.name}]


def _stages(scorer: Scorer) -> list[Scorer]:
    """The batched stages of a scorer: itself and, down a refining chain, each exact scorer that
    refines further (int8 -> [bf16 -> fp32]); the last exact scorer runs unbatched."""
    stages = [scorer]
    while isinstance(stages[-1], RefiningScorer) and isinstance(stages[-1].exact, RefiningScorer):
        stages.append(stages[-1].exact)
    return stages


def _precision(scorer: Scorer) -> str:
    fast = scorer.fast if isinstance(scorer, RefiningScorer) else scorer
    return str(getattr(fast, "precision", "unknown"))


def _budgeted_chunks(
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
