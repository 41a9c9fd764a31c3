"""Scorers against PyTorch on the tiny RoBERTa: ONNX Runtime and OpenVINO fp32 within 1e-4,
OpenVINO bf16 within a bf16-sized tolerance, across padded batches of mixed lengths."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from service.engine import openvino_backend
from service.engine.errors import EngineStopped, ScorerError
from service.engine.export_dir import ExportDir, ExportDirError
from service.engine.onnx_runtime import OnnxScorer
from service.engine.openvino_backend import (
    RUNTIME_CACHE_CAPACITY,
    OpenVinoScorer,
    openvino_bf16_supported,
)
from service.engine.scorer import RefiningScorer, load_scorer
from service.engine.types import Scorer, pad_batch, padded_width
from service.engine.warmup import WARMUP_SHAPES, synthetic_feeds
from tests.unit.engine.conftest import (
    assert_close,
    batches_of_pairs,
    common,
    requires_openvino,
)


def test_onnxruntime_cpu_fp32_matches_pytorch(export, tokenizer, cases) -> None:
    scorer = OnnxScorer(export.model_path("fp32"), device="cpu", **common(export, tokenizer))
    scorer.warmup()
    assert scorer.providers == ["CPUExecutionProvider"]
    assert_close(scorer, cases, atol=1e-4)


@requires_openvino
def test_openvino_fp32_matches_pytorch(export, tokenizer, cases) -> None:
    scorer = OpenVinoScorer(
        export.model_path("fp32"), precision="fp32", **common(export, tokenizer)
    )
    scorer.warmup()
    assert scorer.precision == "fp32"
    assert_close(scorer, cases, atol=1e-4)


@pytest.mark.skipif(not openvino_bf16_supported(), reason="no native bf16 on this CPU")
def test_openvino_bf16_close_to_pytorch(export, tokenizer, cases) -> None:
    scorer = OpenVinoScorer(
        export.model_path("fp32"), precision="bf16", **common(export, tokenizer)
    )
    assert scorer.precision == "bf16"
    spread = max(float(np.ptp(expected)) for _, expected in cases)
    # bf16 keeps 8 mantissa bits: about 0.4% relative error per op, a few % of the spread at worst.
    assert_close(scorer, cases, atol=0.05 * spread, rtol=0.02)


@requires_openvino
def test_openvino_keeps_a_bounded_kernel_cache(export, tokenizer, monkeypatch) -> None:
    """The batcher's shapes vary with every batch: OpenVINO's per-shape kernel cache is compiled
    bounded, so memory levels off under varied load (the plugin accepts the property at compile
    time but cannot report it back, so the compile call is what is checked)."""
    import openvino as ov

    seen: list[dict] = []
    compile_model = ov.Core.compile_model

    def spy(core, model, device, config):  # noqa: ANN001
        seen.append(dict(config))
        return compile_model(core, model, device, config)

    monkeypatch.setattr(ov.Core, "compile_model", spy)
    OpenVinoScorer(export.model_path("fp32"), precision="fp32", **common(export, tokenizer))
    assert seen and seen[0]["CPU_RUNTIME_CACHE_CAPACITY"] == RUNTIME_CACHE_CAPACITY < 5000


@requires_openvino
def test_openvino_scores_do_not_depend_on_padding_to_a_multiple(export, tokenizer) -> None:
    """The batcher pads batch widths in steps (pad_to_multiple): masked pads change nothing."""
    kwargs = common(export, tokenizer)
    scorer = OpenVinoScorer(export.model_path("fp32"), precision="fp32", **kwargs)
    encoded = tokenizer.encode([("short", "a"), ("a longer instruction " * 5, "an answer " * 7)])
    longest = max(e.length for e in encoded)
    plain = scorer.infer(pad_batch(encoded, tokenizer.pad_token_id, export.input_names))
    width = padded_width(longest, 16)
    assert width % 16 == 0 and width > longest
    stepped = scorer.infer(pad_batch(encoded, tokenizer.pad_token_id, export.input_names, width))
    np.testing.assert_allclose(stepped, plain, atol=1e-4)


def test_score_does_not_depend_on_batch_padding(export, tokenizer) -> None:
    scorer = OnnxScorer(export.model_path("fp32"), device="cpu", **common(export, tokenizer))
    pairs = [("short", "a"), ("a much longer instruction " * 10, "and a longer answer " * 20)]
    encoded = tokenizer.encode(pairs)
    together = scorer.infer(pad_batch(encoded, tokenizer.pad_token_id, export.input_names))
    alone = np.concatenate(
        [scorer.infer(pad_batch([e], tokenizer.pad_token_id, export.input_names)) for e in encoded]
    )
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_refining_scorer_passes_on_only_near_tied_leaders(export, tokenizer) -> None:
    kwargs = common(export, tokenizer)
    fast = OnnxScorer(export.model_path("fp32"), device="cpu", **kwargs)
    exact = OnnxScorer(export.model_path("fp32"), device="cpu", **kwargs)
    pairs = batches_of_pairs()[3]  # 17 candidates
    feeds = pad_batch(tokenizer.encode(pairs), tokenizer.pad_token_id, export.input_names)
    truth = exact.infer(feeds)
    # A fast engine that is off by a known amount.
    noisy = truth + np.linspace(-1e-3, 1e-3, len(truth)).astype(np.float32)
    order = np.argsort(-noisy)
    best = float(noisy[order[0]])
    # Midway between the third and the fourth: exactly the top three are within the margin.
    margin = (best - float(noisy[order[2]]) + best - float(noisy[order[3]])) / 2
    scorer = RefiningScorer(fast, exact, margin=margin)
    step = scorer.refinement()
    assert (step.fast, step.exact, step.margin) == (fast, exact, margin)
    assert set(step.near_top(noisy).tolist()) == set(order[:3].tolist())
    clear = np.array([0.5, 0.5 - 2 * margin], dtype=np.float32)
    assert step.near_top(clear).size == 0  # a clear winner is not re-scored
    assert step.near_top(np.array([0.5], dtype=np.float32)).size == 0
    assert fast.refinement() is None  # a backend is one stage
    np.testing.assert_array_equal(scorer.infer(feeds), fast.infer(feeds))  # infer: the fast one


@pytest.mark.skipif(not openvino_bf16_supported(), reason="no native bf16 on this CPU")
def test_refining_scorer_calibrates_its_margin(export, tokenizer) -> None:
    kwargs = common(export, tokenizer)
    model = export.model_path("fp32")
    scorer = RefiningScorer(
        OpenVinoScorer(model, precision="bf16", **kwargs),
        OpenVinoScorer(model, precision="fp32", **kwargs),
    )
    scorer.warmup()
    assert scorer.margin > 0 and scorer.refinement().margin == scorer.margin
    assert scorer.name == "openvino-cpu-bf16-refined" and scorer.precision == "bf16"
    assert (scorer.device, scorer.parallelism) == ("cpu", scorer.fast.parallelism)
    assert (
        scorer.describe()
        == scorer.fast.describe()
        == {
            "streams": scorer.fast.streams,
            "pinned": scorer.fast.pinned,
            "alone": False,
        }
    )


class _ByFirstId(Scorer):
    """Scores a row as its first real token id x `scale`: two of them differ by (scale - 1) x
    that id, more on real text's ids than on the synthetic warm-up's (all under 100)."""

    input_names = ("input_ids", "attention_mask")
    pad_token_id = 1
    device = "cpu"
    precision = "fp32"
    parallelism = 1
    name = "by-first-id"

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return feeds["input_ids"][:, 1].astype(np.float32) * self.scale

    def warmup(self, stop: threading.Event | None = None) -> None:
        pass


def _text(first_id: int) -> dict[str, np.ndarray]:
    ids = np.array([[0, first_id, 2], [0, 7, 2]], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_refining_scorer_widens_its_margin_to_the_error_on_real_text() -> None:
    scorer = RefiningScorer(_ByFirstId(1.001), _ByFirstId(1.0))
    scorer.warmup()
    warm = scorer.margin
    assert 0 < warm < 0.1  # synthetic ids stay under 100: (1.001 - 1) x id < 0.1
    scorer.calibrate([_text(2000)])
    assert scorer.margin == pytest.approx(2.0, rel=1e-3)  # 0.001 x 2000
    assert scorer.refinement().margin == scorer.margin
    scorer.calibrate([_text(500)])  # a smaller difference never narrows it
    assert scorer.margin == pytest.approx(2.0, rel=1e-3)
    scorer.warmup()  # nor does warming up again
    assert scorer.margin == pytest.approx(2.0, rel=1e-3)


def test_a_given_margin_stays_and_a_chained_stage_calibrates_too() -> None:
    inner = RefiningScorer(_ByFirstId(1.001), _ByFirstId(1.0))
    screen = RefiningScorer(_ByFirstId(1.01), inner, margin=0.5)
    screen.warmup()
    screen.calibrate([_text(3000)])
    assert screen.margin == 0.5  # the int8 screen's recorded error
    assert inner.margin == pytest.approx(3.0, rel=1e-3)


class _Overlapping(_ByFirstId):
    """Two stages (`fast` and `exact`) on two workers each, sharing `seen`: every call records
    how many calls run beside it, and waits up to 2 s for a second one to join it."""

    parallelism = 2

    def __init__(self, scale: float, seen: dict[str, Any]) -> None:
        super().__init__(scale)
        self.seen = seen

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        seen = self.seen
        with seen["lock"]:
            seen["running"] += 1
            seen["most"] = max(seen["most"], seen["running"])
            if seen["running"] >= 2:
                seen["two"].set()
        seen["two"].wait(timeout=2.0)
        with seen["lock"]:
            seen["running"] -= 1
        return super().infer(feeds)


def test_the_margin_is_measured_on_every_worker_at_once() -> None:
    """The fast and exact passes of the warm-up and the calibration run on the engines' workers
    at once (a core each on CPU), not one at a time with a core idle."""
    seen: dict[str, Any] = {"lock": threading.Lock(), "running": 0, "most": 0}
    seen["two"] = threading.Event()
    scorer = RefiningScorer(_Overlapping(1.001, seen), _Overlapping(1.0, seen))
    scorer.warmup()
    scorer.calibrate([_text(2000), _text(10), _text(30)])
    assert seen["most"] == 2
    assert scorer.margin == pytest.approx(2.0, rel=1e-3)  # the largest difference, as before


requires_bf16 = pytest.mark.skipif(
    not openvino_bf16_supported(), reason="no native bf16 on this CPU (or no OpenVINO)"
)


@requires_openvino
def test_openvino_scores_a_lone_batch_on_every_thread(export, tokenizer, cases) -> None:
    """With two streams and `alone`, a batch that runs alone goes to the model compiled as one
    stream on both threads: the same scores (fp32 here: to 1e-4 of PyTorch), warmed up too.
    With one stream `infer` already uses every thread, and there is nothing more to compile."""
    kwargs = common(export, tokenizer)
    model = export.model_path("fp32")
    two = OpenVinoScorer(
        model, precision="fp32", hint="THROUGHPUT", num_streams=2, threads=2, alone=True, **kwargs
    )
    alone = two.alone()
    assert alone is not None and two.describe()["alone"] is True
    two.warmup()

    assert_close(SimpleNamespace(infer=alone), cases, atol=1e-4)  # it scores through `infer`
    one = OpenVinoScorer(model, precision="fp32", num_streams=1, alone=True, **kwargs)
    assert one.alone() is None and one.describe()["alone"] is False
    assert RefiningScorer(two, one).alone() == alone  # the fast engine's


def _two_streams_and_alone(export: Any, tokenizer: Any) -> OpenVinoScorer:
    """The fp32 model on two single-core streams, with its lone-batch twin on both threads."""
    return OpenVinoScorer(
        export.model_path("fp32"),
        precision="fp32",
        hint="THROUGHPUT",
        num_streams=2,
        threads=2,
        alone=True,
        **common(export, tokenizer),
    )


@requires_openvino
def test_each_openvino_scorer_makes_its_first_call_alone_when_it_is_built(
    export, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenVINO's binding sets up its numpy bridge on first use, and two threads doing so at once
    can deadlock (`_FIRST_CALLS`): a scorer makes a first call when it is built,
    holding the process-wide lock; the calls of its users (lone-batch, warm-up) do not take it."""
    locked: list[bool] = []
    run = OpenVinoScorer._run

    def recording(self: OpenVinoScorer, *args: Any) -> np.ndarray:
        locked.append(openvino_backend._FIRST_CALLS.locked())
        return run(self, *args)

    monkeypatch.setattr(OpenVinoScorer, "_run", recording)
    scorer = _two_streams_and_alone(export, tokenizer)
    assert locked == [True]
    feeds = synthetic_feeds(4, 32, scorer.input_names, scorer.pad_token_id)
    alone = scorer.alone()
    assert alone is not None
    np.testing.assert_allclose(alone(feeds), scorer.infer(feeds), atol=1e-4)
    scorer.warmup()  # the shapes on both streams at once, then the lone-batch model
    assert len(locked) == 3 + 2 * len(WARMUP_SHAPES) and not any(locked[1:])


@requires_bf16
def test_load_scorer_picks_refined_bf16_where_the_cpu_has_it(export) -> None:
    auto = load_scorer(export, device="cpu")
    assert isinstance(auto, RefiningScorer) and auto.name == "openvino-cpu-bf16-refined"
    assert load_scorer(export, device="cpu", refine=False).name == "openvino-cpu-bf16"
    refined = load_scorer(export, device="cpu", streams=2)
    assert isinstance(refined, RefiningScorer) and refined.parallelism == 2
    # The re-scoring twin runs in turn with the batches on the same workers: unpinned, so it
    # lands on the free core rather than on the core OpenVINO pinned a busy stream to.
    assert isinstance(refined.exact, OpenVinoScorer) and refined.exact.streams == 2
    assert refined.exact.pinned is False
    # A lone batch runs on both cores (the fast engine's own twin); the exact one needs none.
    assert refined.alone() is not None and refined.exact.alone() is None


@pytest.mark.skipif(openvino_bf16_supported(), reason="this CPU has native bf16")
def test_load_scorer_picks_onnxruntime_fp32_without_native_bf16(export) -> None:
    assert load_scorer(export, device="cpu").name == "onnxruntime-cpu-fp32"


@requires_openvino
def test_load_scorer_cpu_choices(export) -> None:
    assert load_scorer(export, device="cpu", engine="onnxruntime").name == "onnxruntime-cpu-fp32"
    assert load_scorer(export, "cpu", "openvino", "fp32").name == "openvino-cpu-fp32"
    with pytest.raises(ScorerError, match="fp16"):
        load_scorer(export, device="cpu", engine="onnxruntime", precision="fp16")
    with pytest.raises(ScorerError, match="bf16 or fp32"):
        load_scorer(export, device="cpu", engine="openvino", precision="int8")
    with pytest.raises(ExportDirError, match="no int8 model"):
        load_scorer(export, device="cpu", engine="onnxruntime", precision="int8")


@requires_openvino
def test_load_scorer_streams_set_how_many_batches_run_at_once(export, cases) -> None:
    one = load_scorer(export, "cpu", "openvino", "fp32", streams=1)
    two = load_scorer(export, "cpu", "openvino", "fp32", streams=2)
    assert (one.parallelism, two.parallelism) == (1, 2)
    auto = load_scorer(export, "cpu", "openvino", "fp32")  # OpenVINO's throughput hint decides
    assert 1 <= auto.parallelism <= 64
    assert_close(two, cases, atol=1e-4)


def test_load_scorer_falls_back_to_onnxruntime_when_openvino_fails(
    export, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.engine import scorer as scorer_module

    def unreadable(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(scorer_module, "OpenVinoScorer", unreadable)
    monkeypatch.setattr(scorer_module, "openvino_bf16_supported", lambda: True)
    assert load_scorer(export, device="cpu").name == "onnxruntime-cpu-fp32"
    with pytest.raises(RuntimeError, match="unsupported operator"):  # asked for: no fallback
        load_scorer(export, device="cpu", engine="openvino")


def test_service_engine_imports_no_torch_transformers_or_fastapi() -> None:
    code = (
        "import sys; import service.engine.scorer, service.engine.tokenize, "
        "service.engine.export_dir; "
        "bad = [m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules]; "
        "print(bad, file=sys.stderr); sys.exit(1 if bad else 0)"
    )
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_load_scorer_int8_screening_is_opt_in(export_copy: Path) -> None:
    """An export with an OpenVINO int8 model: precision int8 screens with it (int8 -> bf16 ->
    fp32, its margin the recorded parity error); auto does not; no recorded error, no screen."""
    ov = pytest.importorskip("openvino")
    from tests.unit.engine.conftest import write_manifest

    # The fp32 graph as an IR stands in for the quantised one: the wiring is under test here.
    ov.save_model(ov.convert_model(str(export_copy / "model.onnx")), str(export_copy / "q.xml"))
    manifest = json.loads((export_copy / "cappy_export.json").read_text())
    models = {**manifest["models"], "openvino-int8": {"file": "q.xml", "weights": "q.bin"}}
    parity = {**manifest["parity"], "openvino-int8": {"status": "passed", "max_abs_diff": 0.0123}}
    write_manifest(export_copy, models=models, parity=parity, pad_token_id=1)
    export = ExportDir.load(export_copy)

    screened = load_scorer(export, device="cpu", precision="int8")
    assert isinstance(screened, RefiningScorer)
    assert screened.fast.name == "openvino-cpu-int8" and screened.margin == 0.0123
    # The bf16 stage between int8 and fp32 where the CPU has native bf16 (else fp32 directly).
    assert isinstance(screened.exact, RefiningScorer) == openvino_bf16_supported()
    if isinstance(screened.exact, RefiningScorer):
        assert screened.exact.name == "openvino-cpu-bf16-refined"
        assert screened.exact.fast.pinned is False  # re-scores in turn with the int8 batches
    assert "int8" not in load_scorer(export, device="cpu").name
    assert load_scorer(export, device="cpu", precision="int8", refine=False).name == (
        "openvino-cpu-int8"
    )

    parity["openvino-int8"] = {"status": "not_measured", "reason": "no runtime"}
    write_manifest(export_copy, models=models, parity=parity, pad_token_id=1)
    # Not measured is not gated: refused with the opt-in named, and even when allowed there is
    # no measured error to make the screen's margin.
    with pytest.raises(ExportDirError, match="CAPPY_ALLOW_UNGATED"):
        load_scorer(ExportDir.load(export_copy), device="cpu", precision="int8")
    allowed = ExportDir.load(export_copy, allow_ungated=True)
    with pytest.raises(ScorerError, match="no measured parity"):
        load_scorer(allowed, device="cpu", precision="int8")


def test_a_stopped_start_runs_no_further_warm_up_or_calibration_pass() -> None:
    """`stop`, set while the refining scorer measures its margin, ends the measurement with
    `EngineStopped` before any pass that had not begun: only the passes already running (one a
    worker) finish, and the margin is not narrowed to what they saw."""
    seen: dict[str, Any] = {"lock": threading.Lock(), "running": 0, "most": 0}
    seen["two"] = threading.Event()
    fast, exact = _Overlapping(1.001, seen), _Overlapping(1.0, seen)
    stop = threading.Event()
    calls: list[str] = []

    def stopping(feeds: Mapping[str, np.ndarray], infer: Any = fast.infer) -> np.ndarray:
        calls.append("fast")
        stop.set()  # the server is told to stop while this pass runs
        return infer(feeds)

    fast.infer = stopping  # type: ignore[method-assign]
    scorer = RefiningScorer(fast, exact)
    with pytest.raises(EngineStopped):
        scorer.warmup(stop)
    # 2 workers: the first fast pass sets `stop`, beside at most one pass already running.
    assert calls == ["fast"] and seen["most"] <= 2
    with pytest.raises(EngineStopped):
        scorer.calibrate([_text(2000)], stop)
    assert calls == ["fast"] and scorer.margin == 0.0


class _WithLoneBatch(_ByFirstId):
    """A fast stage with a lone-batch path that records the stop request it is given."""

    def __init__(self, scale: float) -> None:
        super().__init__(scale)
        self.stops: list[threading.Event | None] = []

    def alone(self) -> Any:
        return self._alone

    def _alone(
        self, feeds: Mapping[str, np.ndarray], stop: threading.Event | None = None
    ) -> np.ndarray:
        self.stops.append(stop)
        return self.infer(feeds)


def test_the_margins_lone_batch_passes_can_be_stopped_too() -> None:
    """The refining scorer's lone-batch passes (the fast model on every core) get the stop
    request, so that one running when the server is told to stop is cancelled as well."""
    fast, stop = _WithLoneBatch(1.001), threading.Event()
    scorer = RefiningScorer(fast, _ByFirstId(1.0))
    scorer.warmup(stop)
    scorer.calibrate([_text(2000)], stop)
    assert len(fast.stops) == len(WARMUP_SHAPES) + 1 and all(s is stop for s in fast.stops)


@requires_openvino
def test_an_openvino_warm_up_stops_after_the_batches_in_hand(export, tokenizer) -> None:
    """Once `stop` is set, no stream takes another warm-up batch and the lone-batch model's
    passes do not start."""
    scorer = _two_streams_and_alone(export, tokenizer)
    stop, stopping = threading.Event(), True
    rows: list[int] = []
    run = scorer._run

    def recording(request: Any, output: Any, feeds: Any, told: Any = None) -> np.ndarray:
        scores = run(request, output, feeds, told)
        rows.append(len(scores))
        if stopping:
            stop.set()  # the server is told to stop once this batch is done
        return scores

    scorer._run = recording  # type: ignore[method-assign]
    with pytest.raises(EngineStopped):
        scorer.warmup(stop)
    assert 1 <= len(rows) <= scorer.parallelism < len(WARMUP_SHAPES)
    stop.clear()
    rows.clear()
    stopping = False
    scorer.warmup(stop)  # not stopped: every shape on the streams, then on the lone-batch model
    assert len(rows) == 2 * len(WARMUP_SHAPES)


def _stopped_while_running(
    run: Callable[[], object], started: threading.Event, stop: threading.Event
) -> list[BaseException]:
    """Runs `run` in a thread, sets `stop` once `started` is set, and returns what `run` raised
    (it must end within 30 s)."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - recorded for the caller
            raised.append(exc)

    worker = threading.Thread(target=target)
    worker.start()
    assert started.wait(10)
    stop.set()
    worker.join(30)
    assert not worker.is_alive()
    return raised


class _Endless:
    """An OpenVINO infer request whose batch runs until it is cancelled."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()

    def start_async(self, inputs: Mapping[str, np.ndarray]) -> None:
        assert set(inputs) == {"input_ids", "attention_mask"}
        self.started.set()

    def wait_for(self, timeout_ms: int) -> bool:
        return self.cancelled.wait(timeout_ms / 1000)

    def cancel(self) -> None:
        self.cancelled.set()

    def wait(self) -> None:
        raise RuntimeError("Infer Request was canceled")


@requires_openvino
def test_a_running_openvino_warm_up_batch_is_cancelled_once_stop_is_set(export, tokenizer) -> None:
    """A warm-up batch runs asynchronously and is cancelled when `stop` is set while it runs
    (OpenVINO's CPU plugin then stops between the graph's nodes): a large model's batch of
    several seconds does not hold up a server told to stop."""
    model = export.model_path("fp32")
    scorer = OpenVinoScorer(model, precision="fp32", **common(export, tokenizer))
    request, stop = _Endless(), threading.Event()
    feeds = synthetic_feeds(2, 16, scorer.input_names, scorer.pad_token_id)
    raised = _stopped_while_running(
        lambda: scorer._run(request, None, feeds, stop), request.started, stop
    )
    assert request.cancelled.is_set()
    assert len(raised) == 1 and isinstance(raised[0], EngineStopped)


def test_an_onnxruntime_warm_up_told_to_stop_runs_no_batch(export, tokenizer) -> None:
    scorer = OnnxScorer(export.model_path("fp32"), device="cpu", **common(export, tokenizer))
    stop = threading.Event()
    stop.set()
    scorer._infer_on = lambda *_: pytest.fail("a batch ran after stop")  # type: ignore[method-assign]
    with pytest.raises(EngineStopped):
        scorer.warmup(stop)
    assert scorer._slots.qsize() == scorer.parallelism  # every session handed back


class _UntilTerminated:
    """An ONNX Runtime session whose run lasts until its run options' `terminate` flag is raised,
    then fails as ONNX Runtime does."""

    def __init__(self) -> None:
        self.started = threading.Event()

    def run(self, names: Any, feeds: Any, options: Any = None) -> list[np.ndarray]:
        assert len(names) == 1 and "input_ids" in feeds
        self.started.set()
        for _ in range(3000):  # 30 s at most: a test that never stops it fails, not hangs
            if options is not None and options.terminate:
                raise RuntimeError("Exiting due to terminate flag being set to true.")
            threading.Event().wait(0.01)
        raise AssertionError("the run was never terminated")


def test_a_running_onnxruntime_warm_up_batch_is_terminated_once_stop_is_set(
    export, tokenizer
) -> None:
    """A warm-up batch on ONNX Runtime (the CPU path without native bf16) runs with run options
    whose `terminate` flag is raised when `stop` is set: the batch fails between two nodes,
    and the warm-up ends with `EngineStopped`, its session handed back."""
    scorer = OnnxScorer(export.model_path("fp32"), device="cpu", **common(export, tokenizer))
    session = _UntilTerminated()
    slot = scorer._slots.get()
    scorer._slots.put(dataclasses.replace(slot, session=session))
    stop = threading.Event()
    raised = _stopped_while_running(lambda: scorer.warmup(stop), session.started, stop)
    assert len(raised) == 1 and isinstance(raised[0], EngineStopped)
    assert scorer._slots.qsize() == scorer.parallelism
