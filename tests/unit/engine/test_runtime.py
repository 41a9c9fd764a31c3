"""ScoringRuntime with a refining chain of fake engines (int8 -> bf16 -> fp32): ranking re-scores
only each stage's near-ties, batched stages run behind their own batchers (the exact one on the
last batcher's workers), /score uses the most precise batched stage, and the winner is the exact
engine's.

The fakes score a row from its token ids: the "truth" is a fixed function of the ids, and each
fake precision adds an error of known bound, so the margins below make the chain exact.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import numpy as np
import pytest

from cappy.probe_sets import probe_sets
from service.engine import runtime as runtime_module
from service.engine.batching_config import BatcherConfig
from service.engine.errors import DeadlineExceeded
from service.engine.openvino_backend import openvino_bf16_supported
from service.engine.runtime import RuntimeConfig, ScoringRuntime
from service.engine.scorer import RefiningScorer
from service.engine.types import Scorer, pad_batch
from service.metrics import REGISTRY
from tests.unit.engine.conftest import WORDS, TinyExport

INT8_ERROR, BF16_ERROR = 2e-2, 2e-3
# At least twice each error bound, so the best candidate can never be left out; the bf16 one
# wider than it needs to be, so that the fp32 stage has near-ties to settle here.
INT8_MARGIN, BF16_MARGIN = 2 * INT8_ERROR, 0.03


def truth_of(ids: np.ndarray) -> float:
    return float((int(ids.astype(np.int64) @ np.arange(1, ids.size + 1)) % 1009) / 1009)


class FakeEngine(Scorer):
    """Scores each row as truth + error * a fixed pseudo-random value in [-1, 1]; counts rows."""

    input_names = ("input_ids", "attention_mask")
    pad_token_id = 1
    device = "cpu"
    parallelism = 1

    def __init__(self, precision: str, error: float) -> None:
        self.name = f"fake-{precision}"
        self.precision = precision
        self.error = error
        self.rows = 0
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        out = []
        for ids, mask in zip(feeds["input_ids"], feeds["attention_mask"], strict=True):
            real = ids[mask.astype(bool)]
            noise = np.sin(float(real.sum()) * 12.9898) if self.error else 0.0
            out.append(truth_of(real) + self.error * noise)
        with self._lock:
            self.rows += len(out)
            self.threads.add(threading.current_thread().name)
        return np.asarray(out, dtype=np.float32)

    def warmup(self, stop: threading.Event | None = None) -> None:
        pass


@pytest.fixture
async def chain_runtime(tiny_engine_export: TinyExport, monkeypatch: pytest.MonkeyPatch):
    int8, bf16 = FakeEngine("int8", INT8_ERROR), FakeEngine("bf16", BF16_ERROR)
    fp32 = FakeEngine("fp32", 0.0)
    scorer = RefiningScorer(
        int8, RefiningScorer(bf16, fp32, margin=BF16_MARGIN), margin=INT8_MARGIN
    )
    monkeypatch.setattr(runtime_module, "load_scorer", lambda *_a, **_k: scorer)
    runtime = ScoringRuntime(
        RuntimeConfig(
            export_dir=tiny_engine_export.path,
            batcher=BatcherConfig(max_wait_ms=1.0, padding_tolerance=1.0),
        )
    )
    await runtime.start()
    assert runtime.ready, runtime.load_error
    for engine in (int8, bf16, fp32):
        engine.rows = 0  # forget the warm-up
        engine.threads.clear()
    yield runtime, (int8, bf16, fp32)
    await runtime.stop()


async def test_the_runtime_calibrates_its_margin_on_the_probe_sets(
    tiny_engine_export: TinyExport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After warm-up, the loaded scorer measures its margin on the probe sets' text too: one
    padded batch a set (but the 3 built to be cut), tokenized by the export's tokenizer, and the
    margin follows the fast/exact difference on them (`FakeEngine`'s error is a fixed function
    of the ids)."""
    fast, exact = FakeEngine("bf16", 0.01), FakeEngine("fp32", 0.0)
    scorer = RefiningScorer(fast, exact)
    seen: list[Mapping[str, np.ndarray]] = []
    calibrate = scorer.calibrate
    monkeypatch.setattr(
        scorer, "calibrate", lambda text, stop: (seen.extend(text), calibrate(text, stop))
    )
    monkeypatch.setattr(runtime_module, "load_scorer", lambda *_a, **_k: scorer)
    runtime = ScoringRuntime(RuntimeConfig(export_dir=tiny_engine_export.path))
    await runtime.start()
    try:
        assert runtime.ready, runtime.load_error
        sizes = {len(s.candidates) for s in probe_sets()}
        assert len(seen) == 13 and all(len(feeds["input_ids"]) in sizes for feeds in seen)
        on_text = max(float(np.abs(fast.infer(f) - exact.infer(f)).max()) for f in seen)
        assert scorer.margin >= on_text > 0
    finally:
        await runtime.stop()


def candidates(n: int) -> list[str]:
    return [f"answer number {i} with {'some ' * (i % 5)}words" for i in range(n)]


def rescored(precision: str) -> float:
    value = REGISTRY.get_sample_value("cappy_pairs_rescored_total", {"precision": precision})
    return value or 0.0


async def test_chain_ranks_like_the_exact_engine_and_rescores_only_near_ties(
    chain_runtime,
) -> None:
    runtime, (int8, bf16, fp32) = chain_runtime
    assert len(runtime.batchers) == 2  # int8 and bf16 batched; fp32 on the bf16 workers
    assert runtime.batcher is runtime.batchers[-1]
    texts = candidates(64)
    pairs = [("what is it?", t) for t in texts]
    # References from fresh engines (the served ones count the rows they score).
    truth = FakeEngine("fp32", 0.0).infer(_feeds(runtime, pairs))
    int8_scores = FakeEngine("int8", INT8_ERROR).infer(_feeds(runtime, pairs))
    bf16_scores = FakeEngine("bf16", BF16_ERROR).infer(_feeds(runtime, pairs))

    served = [r.score for r in await runtime.score(pairs)]
    np.testing.assert_allclose(served, bf16_scores, atol=1e-6)  # /score: the bf16 stage
    assert (int8.rows, bf16.rows, fp32.rows) == (0, 64, 0)

    before = {p: rescored(p) for p in ("bf16", "fp32")}
    rows = {name: engine.rows for name, engine in (("int8", int8), ("bf16", bf16), ("fp32", fp32))}
    results = await runtime.rank("what is it?", texts)

    scores = np.array([r.score for r in results])
    assert int(np.argmax(scores)) == int(np.argmax(truth))
    assert scores[int(np.argmax(truth))] == pytest.approx(float(truth.max()), abs=1e-6)
    assert int8.rows - rows["int8"] == 64  # every candidate screened once
    to_bf16 = bf16.rows - rows["bf16"]
    to_fp32 = fp32.rows - rows["fp32"]
    assert 2 <= to_bf16 < 64 and 1 <= to_fp32 <= to_bf16  # only near-ties go further
    assert rescored("bf16") - before["bf16"] == to_bf16
    assert rescored("fp32") - before["fp32"] == to_fp32
    # The exact stage takes turns on the last batcher's workers, not a thread beside them.
    assert fp32.threads and all(name.startswith("cappy-model") for name in fp32.threads)
    # A candidate keeps the score of the last stage that scored it: far ones keep int8's.
    far = int8_scores < int8_scores.max() - INT8_MARGIN
    assert far.any()
    np.testing.assert_allclose(scores[far], int8_scores[far], atol=1e-6)


async def test_chain_with_a_clear_winner_or_one_candidate_stops_at_the_screen(
    chain_runtime,
) -> None:
    runtime, (int8, bf16, fp32) = chain_runtime
    before = (int8.rows, bf16.rows, fp32.rows)
    clear = candidates(4)  # scores spread over [0, 1): far apart relative to the margins
    await runtime.rank("what is it?", clear)
    [only] = await runtime.rank("what is it?", ["the only answer"])
    assert (int8.rows, bf16.rows, fp32.rows) == (before[0] + 5, before[1], before[2])
    assert isinstance(only.score, float)


async def test_describe_lists_the_stages(chain_runtime) -> None:
    runtime, _ = chain_runtime
    stages = runtime.describe()["stages"]
    assert [s["engine"] for s in stages] == ["fake-int8", "fake-bf16", "fake-fp32"]
    assert stages[0]["rescore_margin"] == pytest.approx(INT8_MARGIN)
    assert stages[1]["rescore_margin"] == pytest.approx(BF16_MARGIN)
    assert runtime.describe()["pad_to_multiple"] == 8  # the default batch width step


async def test_stop_drains_and_stops_every_stage(chain_runtime) -> None:
    runtime, _ = chain_runtime
    await runtime.stop()
    assert not runtime.alive and not runtime.ready and runtime.phase == "stopped"
    assert all(not b.alive for b in runtime.batchers)


def _feeds(runtime: ScoringRuntime, pairs: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    assert runtime.tokenizer is not None
    return pad_batch(runtime.tokenizer.encode(pairs), 1, ["input_ids", "attention_mask"])


class SlowEngine(FakeEngine):
    """An exact engine that records each batch's shape and takes `delay` seconds per batch."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__("fp32", 0.0)
        self.delay = delay
        self.shapes: list[tuple[int, int]] = []

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        self.shapes.append(feeds["input_ids"].shape)
        time.sleep(self.delay)
        return super().infer(feeds)


async def start_two_stage(
    export: TinyExport,
    monkeypatch: pytest.MonkeyPatch,
    exact: FakeEngine,
    *,
    max_rescored: int = 16,
    max_batch_tokens: int | None = None,
) -> tuple[ScoringRuntime, FakeEngine]:
    """bf16 -> fp32 with a margin so wide that every candidate is a near-tie."""
    bf16 = FakeEngine("bf16", BF16_ERROR)
    scorer = RefiningScorer(bf16, exact, margin=10.0)
    monkeypatch.setattr(runtime_module, "load_scorer", lambda *_a, **_k: scorer)
    batcher = BatcherConfig(max_wait_ms=1.0, max_batch_tokens=max_batch_tokens)
    runtime = ScoringRuntime(
        RuntimeConfig(export_dir=export.path, batcher=batcher, max_rescored=max_rescored)
    )
    await runtime.start()
    assert runtime.ready, runtime.load_error
    bf16.rows = exact.rows = 0
    if isinstance(exact, SlowEngine):
        exact.shapes.clear()  # forget the warm-up
    return runtime, bf16


async def test_identical_candidates_are_scored_once_and_ties_keep_the_lowest_index(
    chain_runtime,
) -> None:
    runtime, (int8, bf16, fp32) = chain_runtime
    same = "b " * 300
    texts = ["a different answer", *([same] * 50), "another one"]
    results = await runtime.rank("what is it?", texts)
    assert int8.rows == 3  # three distinct texts
    assert bf16.rows <= 3 and fp32.rows <= 3
    assert len(results) == 52
    assert len({results[i].score for i in range(1, 51)}) == 1  # one result, shared
    assert all(results[i] == results[1] for i in range(1, 51))
    scores = [r.score for r in results]
    best = max(scores)
    assert scores.index(best) == int(np.argmax(scores))  # the first of equals wins


async def test_rescoring_runs_in_budget_sized_batches_and_stops_past_the_cap(
    tiny_engine_export: TinyExport, monkeypatch: pytest.MonkeyPatch
) -> None:
    exact = SlowEngine()
    runtime, bf16 = await start_two_stage(
        tiny_engine_export,
        monkeypatch,
        exact,
        max_rescored=12,
        max_batch_tokens=96,
    )
    try:
        # Every candidate is a near-tie: 12 are all re-scored, in fp32 throughout.
        texts = candidates(12)
        pairs = [("what is it?", t) for t in texts]
        truth = FakeEngine("fp32", 0.0).infer(_feeds(runtime, pairs))
        scores = np.array([r.score for r in await runtime.rank("what is it?", texts)])
        assert exact.rows == 12
        np.testing.assert_allclose(scores, truth, atol=1e-7)
        assert len(exact.shapes) > 1  # 12 pairs do not fit one 96-token batch
        assert all(rows * width <= 96 or rows == 1 for rows, width in exact.shapes)

        # 64 are more than the cap: none is re-scored, and the ranking stays in bf16 throughout.
        texts = candidates(64)
        bf16_scores = FakeEngine("bf16", BF16_ERROR).infer(
            _feeds(runtime, [("what is it?", t) for t in texts])
        )
        scores = np.array([r.score for r in await runtime.rank("what is it?", texts)])
        assert exact.rows == 12
        np.testing.assert_allclose(scores, bf16_scores, atol=1e-7)
    finally:
        await runtime.stop()


async def test_exact_rescoring_respects_the_deadline(
    tiny_engine_export: TinyExport, monkeypatch: pytest.MonkeyPatch
) -> None:
    exact = SlowEngine(delay=0.1)
    runtime, _ = await start_two_stage(tiny_engine_export, monkeypatch, exact, max_batch_tokens=64)
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await runtime.rank("what is it?", candidates(16), deadline=started + 0.25)
        # Stopped at the deadline, not after the work: 16 leaders would take 8+ batches of 0.1 s.
        assert len(exact.shapes) <= 4
    finally:
        await runtime.stop()


@pytest.mark.skipif(not openvino_bf16_supported(), reason="no native bf16 on this CPU")
async def test_candidates_identical_after_truncation_tie_in_one_precision(
    tiny_engine_export: TinyExport,
) -> None:
    """The field report, on the served CPU scorer (OpenVINO bf16, near-ties re-scored in fp32,
    at most 16): 50 different texts, identical once truncated at the export's max length, were
    scored as 50 candidates; the 16 re-scored in fp32 ranked below the 34 left in bf16, and
    index 16 won. Identical encodings are one candidate: one score, and index 0 wins."""
    runtime = ScoringRuntime(RuntimeConfig(export_dir=tiny_engine_export.path, max_rescored=16))
    await runtime.start()
    try:
        assert runtime.ready, runtime.load_error
        assert runtime.scorer is not None and runtime.tokenizer is not None
        step = runtime.scorer.refinement()
        assert step is not None and (step.fast.precision, step.exact.precision) == ("bf16", "fp32")
        instruction = "Summarise the text."
        text = " ".join(WORDS * 60)
        texts = [f"{text} variant {i}" for i in range(50)]
        encoded = runtime.tokenizer.encode([(instruction, t) for t in texts])
        assert all(e.truncated and e.length == 512 for e in encoded)
        assert len({e.input_ids.tobytes() for e in encoded}) == 1

        results = await runtime.rank(instruction, texts)
        scores = [r.score for r in results]
        assert scores == [scores[0]] * 50
        assert max(range(50), key=lambda i: (scores[i], -i)) == 0
        # One distinct candidate: no near-ties, the bf16 score.
        feeds = pad_batch(encoded[:1], step.fast.pad_token_id, step.fast.input_names)
        assert scores[0] == pytest.approx(float(step.fast.infer(feeds)[0]), abs=1e-6)
    finally:
        await runtime.stop()
