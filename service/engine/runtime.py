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
from service.engine.export_dir import ExportDir
from service.engine.scorer import RefiningScorer, load_scorer
from service.engine.tokenize import PairTokenizer
from service.engine.types import Scorer, pad_batch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeConfig:
    export_dir: Path
    device: str = "auto"
    engine: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    streams: int | None = None
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
        self.batcher: DynamicBatcher | None = None
        self.load_error: str | None = None
        self.load_seconds: float | None = None

    @property
    def ready(self) -> bool:
        return self.phase == "ready" and self.batcher is not None and self.batcher.alive

    @property
    def loading(self) -> bool:
        return self.phase in ("exporting", "loading")

    def _load_blocking(self) -> None:
        export_dir = self.config.export_dir
        if self._prepare is not None:  # phase is "exporting" since __init__
            export_dir = self._prepare()
        self.phase = "loading"
        started = time.perf_counter()
        export = ExportDir.load(export_dir)
        tokenizer = PairTokenizer.from_dir(
            export.path,
            max_length=export.max_length,
            with_token_type_ids="token_type_ids" in export.input_names,
        )
        scorer = load_scorer(
            export,
            device=self.config.device,  # type: ignore[arg-type]
            engine=self.config.engine,  # type: ignore[arg-type]
            precision=self.config.precision,  # type: ignore[arg-type]
            threads=self.config.threads,
            streams=self.config.streams,
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
            self.batcher = DynamicBatcher(self.scorer, self.tokenizer.encode, self.config.batcher)
            await self.batcher.start()
            self.phase = "ready"
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.phase = "failed"
            logger.error("the scorer failed to load: %s", self.load_error)

    async def stop(self, timeout: float | None = None) -> None:
        """Finishes the work already accepted, then stops the batcher."""
        if self.phase != "failed":
            self.phase = "stopped"
        if self.batcher is not None:
            await self.batcher.stop(drain=True, timeout=timeout)

    async def score(
        self, pairs: Sequence[tuple[str, str]], *, deadline: float | None = None
    ) -> list[ScoredPair]:
        assert self.batcher is not None
        return await self.batcher.score(pairs, deadline=deadline)

    async def rank(
        self, instruction: str, candidates: Sequence[str], *, deadline: float | None = None
    ) -> list[ScoredPair]:
        """Scores candidates for one instruction, for ranking them.

        With a refining scorer (bf16 + fp32 on CPU), the candidates within its margin of the best
        are re-scored in fp32, so the winner and the order of the leaders are fp32's.
        """
        pairs = [(instruction, candidate) for candidate in candidates]
        results = await self.score(pairs, deadline=deadline)
        scorer = self.scorer
        if not isinstance(scorer, RefiningScorer) or len(results) < 2:
            return results
        leaders = scorer.near_top(np.array([r.score for r in results], dtype=np.float32))
        if not leaders.size:
            return results
        tokenizer = self.tokenizer
        assert tokenizer is not None
        leader_pairs = [pairs[i] for i in leaders]

        def rescore() -> np.ndarray:
            encoded = tokenizer.encode(leader_pairs)
            return scorer.infer_exact(pad_batch(encoded, scorer.pad_token_id, scorer.input_names))

        # Beside the batches, not queued behind them: the fast engine leaves the cores idle often
        # enough (between batches, at its thread barriers) that this measured faster (README).
        exact = await asyncio.to_thread(rescore)
        metrics.PAIRS_RESCORED.inc(len(leaders))
        refined = list(results)
        for row, index in enumerate(leaders):
            refined[index] = replace(results[index], score=float(exact[row]))
        return refined

    def describe(self) -> dict[str, Any]:
        scorer = self.scorer
        tolerance = self.batcher.padding_tolerance if self.batcher is not None else None
        return {
            "engine": getattr(scorer, "name", None),
            "device": getattr(scorer, "device", None),
            "precision": getattr(scorer, "precision", None),
            "streams": getattr(scorer, "parallelism", 1) if scorer is not None else None,
            # null when unlimited (JSON has no infinity)
            "padding_tolerance": tolerance
            if tolerance is None or math.isfinite(tolerance)
            else None,
            "rescore_margin": getattr(scorer, "margin", None),
            "load_seconds": None if self.load_seconds is None else round(self.load_seconds, 2),
        }
