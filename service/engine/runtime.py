"""The scoring runtime: one export directory loaded into a tokenizer, a scorer and its batchers,
with an explicit lifecycle (load and warm up, then serve; switch to another export without
failing a request; drain, then stop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from service import defaults
from service.engine import cascade, warmup
from service.engine.batcher import DynamicBatcher, ScoredPair
from service.engine.batching_config import BatcherConfig
from service.engine.errors import EngineError, EngineStopped
from service.engine.export_dir import ExportDir
from service.engine.scorer import load_scorer
from service.engine.tokenize import PairTokenizer
from service.engine.types import Device, Engine, Precision, Scorer, stop_if_asked

logger = logging.getLogger(__name__)


class ReloadError(EngineError):
    """A reload cannot start now (not serving, or another reload under way)."""


@dataclass
class _Loaded:
    """One loaded model and its batchers: what a request uses from start to end."""

    export: ExportDir
    tokenizer: PairTokenizer
    scorer: Scorer
    batchers: list[DynamicBatcher]
    cascade: cascade.Cascade
    seconds: float
    users: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


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
    max_rescored: int = defaults.MAX_RESCORED
    # Serve graphs that did not pass a parity gate (an export made with --parity record).
    allow_ungated: bool = False
    batcher: BatcherConfig = field(default_factory=BatcherConfig)


class ScoringRuntime:
    """Loads the model off the event loop; `ready` turns true only after warm-up.

    Args:
        config: what to load and how to serve it.
        prepare: called first, off the event loop, when `config.export_dir` must be produced
            (exporting a checkpoint or hub id): it returns the export directory to load, or
            raises `EngineStopped` once the event it is given (set by `stop`) is set.

    `phase` says where it stands: "exporting", "loading", "ready", "failed" or "stopped".
    `stop` during the start stops it where it stands: an export is interrupted, a warm-up
    batch cancelled.
    """

    def __init__(
        self, config: RuntimeConfig, prepare: Callable[[threading.Event], Path] | None = None
    ) -> None:
        self.config = config
        self._prepare = prepare
        self.phase = "exporting" if prepare is not None else "loading"
        self.export: ExportDir | None = None
        self.tokenizer: PairTokenizer | None = None
        self.scorer: Scorer | None = None
        # One batcher per batched stage of the scorer (cascade.batched_stages); `batcher` is
        # the one /score uses, the most precise batched stage.
        self.batchers: list[DynamicBatcher] = []
        self.batcher: DynamicBatcher | None = None
        self.cascade: cascade.Cascade | None = None
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self._loaded: _Loaded | None = None
        self._reloading = asyncio.Lock()
        # Set by `stop`: an export, load or warm-up under way (start or reload) stops.
        self._stopping = threading.Event()
        # Made when `start` begins, set when it has ended (whichever way).
        self._started: asyncio.Event | None = None

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

    def _load(self, export_dir: Path) -> _Loaded:
        """Reads, verifies, loads and warms one export directory (blocking: run off the loop).

        Raises:
            EngineStopped: `stop` was called before the model was warm.
        """
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
        warmup.warm_up(scorer, tokenizer.encode, self._stopping)
        batchers = [
            DynamicBatcher(stage, tokenizer.encode, config.batcher, export.max_length)
            for stage in cascade.batched_stages(scorer)
        ]
        ranking = cascade.Cascade(
            scorer, batchers, max_rescored=config.max_rescored, max_length=export.max_length
        )
        seconds = time.perf_counter() - started
        logger.info(
            "scorer %s from %s loaded and warm in %.1f s (max_length %d)",
            scorer.name,
            export.path,
            seconds,
            export.max_length,
        )
        return _Loaded(export, tokenizer, scorer, batchers, ranking, seconds)

    async def _serve(self, loaded: _Loaded) -> None:
        """Starts a loaded model's batchers and makes it the one requests use."""
        started: list[DynamicBatcher] = []
        try:
            for batcher in loaded.batchers:
                await batcher.start()
                started.append(batcher)
        except BaseException:
            for batcher in started:
                await batcher.stop(drain=False)
            raise
        self._loaded = loaded
        self.export, self.tokenizer, self.scorer = loaded.export, loaded.tokenizer, loaded.scorer
        self.batchers, self.batcher = loaded.batchers, loaded.batchers[-1]
        self.cascade, self.load_seconds = loaded.cascade, loaded.seconds

    async def start(self) -> None:
        """Loads, warms up and starts the batcher; records a load failure instead of raising.
        Stopped first (`stop`), it ends without serving."""
        self._started = started = asyncio.Event()
        try:
            export_dir = self.config.export_dir
            if self._prepare is not None:  # phase is "exporting" since __init__
                export_dir = await asyncio.to_thread(self._prepare, self._stopping)
            stop_if_asked(self._stopping)
            self.phase = "loading"
            loaded = await asyncio.to_thread(self._load, export_dir)
            stop_if_asked(self._stopping)
            await self._serve(loaded)
            self.phase = "ready"
        except EngineStopped:
            logger.info("start-up stopped before the scorer was ready")
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.phase = "failed"
            logger.error("the scorer failed to load: %s", self.load_error)
        finally:
            started.set()

    async def stop(self, timeout: float | None = None) -> None:
        """Stops a start still under way (its export interrupted, its warm-up batch cancelled),
        or finishes the work already accepted and then stops the batchers."""
        self._stopping.set()
        if self.phase != "failed":
            self.phase = "stopped"
        if self._started is not None:
            await self._started.wait()
        # First stage first: its drained requests may still queue leaders on the next stage.
        for batcher in self.batchers:
            await batcher.stop(drain=True, timeout=timeout)

    async def reload(self, export_dir: Path) -> None:
        """Switches to another export directory without failing a request: the new model is
        loaded and warmed beside the serving one, then takes every new request; requests in
        flight finish on the old one, whose batchers then drain and stop.

        Raises:
            ReloadError: not serving, or another reload is under way.
            EngineStopped: `stop` was called while the new model loaded.
            ExportDirError, ScorerError and the like: the directory cannot be served (the old
                model keeps serving).
        """
        if self.phase != "ready" or self._loaded is None:
            raise ReloadError(f"the runtime is {self.phase}, not serving: nothing to reload")
        if self._reloading.locked():
            raise ReloadError("another reload is under way")
        async with self._reloading:
            loaded = await asyncio.to_thread(self._load, export_dir)
            stop_if_asked(self._stopping)
            old = self._loaded
            await self._serve(loaded)
            self.config = replace(self.config, export_dir=loaded.export.path)
            logger.info("serving %s (was %s)", loaded.export.path, old.export.path)
            await old.idle.wait()
            for batcher in old.batchers:
                await batcher.stop(drain=True)

    @contextlib.contextmanager
    def _in_use(self) -> Iterator[_Loaded]:
        """The model a request uses from its start to its end, even if a reload switches."""
        loaded = self._loaded
        if loaded is None:
            raise EngineStopped()
        loaded.users += 1
        loaded.idle.clear()
        try:
            yield loaded
        finally:
            loaded.users -= 1
            if loaded.users == 0:
                loaded.idle.set()

    async def score(
        self, pairs: Sequence[tuple[str, str]], *, deadline: float | None = None
    ) -> list[ScoredPair]:
        with self._in_use() as loaded:
            return await loaded.batchers[-1].score(pairs, deadline=deadline)

    async def rank(
        self, instruction: str, candidates: Sequence[str], *, deadline: float | None = None
    ) -> list[ScoredPair]:
        """Scores candidates for one instruction, for ranking them.

        Identical texts are tokenized once; candidates whose encodings are identical (texts that
        differ only past the truncation, too) are scored once and share the score, so that they
        tie exactly and the lowest index wins. The cascade (service/engine/cascade.py) ranks by
        its rule: with a refining scorer the near-ties are compared in fp32, or all in the
        previous stage's precision when there are more than `max_rescored` of them. Every stage
        goes through the batch budget and the deadline.

        Raises:
            DeadlineExceeded: the deadline passed, in any stage.
            and whatever `DynamicBatcher.score_encoded` raises.
        """
        if deadline is None and self.config.batcher.default_timeout_s is not None:
            deadline = time.monotonic() + self.config.batcher.default_timeout_s
        slot_of: dict[str, int] = {}
        slots = [slot_of.setdefault(text, len(slot_of)) for text in candidates]
        with self._in_use() as loaded:  # one model's tokenizer and cascade throughout
            encoded = await loaded.batchers[0].encode([(instruction, t) for t in slot_of])
            results = await loaded.cascade.rank(encoded, deadline=deadline)
        return [results[slot] for slot in slots]

    def describe(self) -> dict[str, Any]:
        scorer = self.scorer
        batcher = self.batcher
        tolerance = batcher.padding_tolerance if batcher is not None else None
        return {
            "engine": scorer.name if scorer is not None else None,
            # Ranking runs these in order, each re-scoring the previous one's near-ties (within
            # its margin); /score uses the last batched one (all but an unbatched fp32 stage).
            "stages": cascade.describe(scorer) if scorer is not None else [],
            "device": scorer.device if scorer is not None else None,
            "precision": scorer.precision if scorer is not None else None,
            "streams": scorer.parallelism if scorer is not None else None,
            # null when unlimited (JSON has no infinity)
            "padding_tolerance": tolerance
            if tolerance is None or math.isfinite(tolerance)
            else None,
            "pad_to_multiple": self.config.batcher.pad_to_multiple,
            # The batch limits in force (unset settings resolved for the device).
            "max_batch_tokens": batcher.max_batch_tokens if batcher is not None else None,
            "max_batch_size": batcher.max_batch_size if batcher is not None else None,
            "max_wait_ms": batcher.max_wait_ms if batcher is not None else None,
            # ONNX Runtime: execution providers (TensorRT, CUDA, CPU), sessions, IO binding.
            "backend": scorer.describe() if scorer is not None else None,
            "load_seconds": None if self.load_seconds is None else round(self.load_seconds, 2),
        }
