"""The choice of scorer (`load_scorer`) and the refining wrapper that chains two of them.

The backends behind the `Scorer` protocol (service/engine/types.py):

- `OnnxScorer` (service/engine/onnx_runtime.py): ONNX Runtime. On a GPU: the CUDA execution
  provider with the fp16 graph, several sessions (streams) in flight, inputs bound from pinned
  host buffers. On CPU: the CPU provider with one intra-op thread per usable core.
- `OpenVinoScorer` (service/engine/openvino_backend.py): the OpenVINO runtime reading the same
  model.onnx, computing in bf16 where the CPU has native bf16 (AVX512_BF16 / AMX), f32 otherwise.
- `RefiningScorer` (here): a fast scorer (OpenVINO bf16) plus an exact twin (OpenVINO f32) that
  re-scores only the near-tied leaders of a candidate set, so that rankings match fp32.

Measured on a 2-core AVX512-BF16 machine with the MiniLM export (loadtests/engine_bench.py):
OpenVINO bf16 ~2x the pairs/s of ONNX Runtime or OpenVINO fp32, argmax agreement with PyTorch
fp32 ~97% alone and 100% refined (about 2% of pairs re-scored). ONNX Runtime int8 was slower
than bf16 and 71% faithful. See `load_scorer` for the defaults.

All backends return the raw regression output `logits[:, 0]` as float32, one value per row.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from service.engine.errors import ScorerError
from service.engine.export_dir import ExportDir, ExportDirError
from service.engine.onnx_runtime import OnnxScorer, cuda_available, cuda_provider_built
from service.engine.openvino_backend import (
    OpenVinoScorer,
    openvino_bf16_supported,
    openvino_importable,
    openvino_precision,
)
from service.engine.types import (
    Device,
    Engine,
    GraphInputs,
    LoneBatch,
    Precision,
    Refinement,
    Scorer,
)
from service.engine.warmup import WARMUP_SHAPES, synthetic_feeds

logger = logging.getLogger(__name__)


class RefiningScorer(Scorer):
    """A fast approximate scorer paired with an exact one on the same graph, for faithful ranking.

    bf16 keeps 8 mantissa bits: a score moves by up to ~1e-3 of its scale, enough to swap two
    candidates whose fp32 scores are that close (on a random-head MiniLM, 3% of the benchmark's
    candidate sets). `infer` runs the fast engine for everything; the ranking cascade
    (service/engine/cascade.py) then re-scores with the exact engine only the candidates within
    `margin` of the best one (`Refinement.near_top`; about 2% of pairs on the benchmark), so the
    winner and the order of the leaders are those of fp32 wherever the fast engine's error stays
    within the margin. The margin is the largest fast/exact difference on the warm-up's batches and
    on the probe sets' real text (`calibrate`): the synthetic batches alone give a mean-pooled
    MiniLM 1.1e-3 against 3.9e-3 measured on the benchmark's sets, and leave 1 set of 260 with a
    winner other than fp32's; with the text, 3.0e-3 and none (loadtests/README.md).

    Attributes:
        fast: the scorer `infer` uses (OpenVINO bf16).
        exact: the fp32 scorer used for the near-ties (OpenVINO f32).
        margin: the score distance under which candidates are re-scored; `margin_factor` x the
            largest fast/exact difference seen at warm-up and calibration, unless given.
    """

    def __init__(
        self,
        fast: Scorer,
        exact: Scorer,
        *,
        margin: float | None = None,
        margin_factor: float = 1.0,
    ) -> None:
        self.fast = fast
        self.exact = exact
        self.name = f"{fast.name}-refined"
        self.input_names = fast.input_names
        self.pad_token_id = fast.pad_token_id
        self.device = fast.device
        self.precision = fast.precision
        self.parallelism = fast.parallelism
        self._fixed_margin = margin
        self._margin_factor = margin_factor
        self._measured = 0.0  # the largest fast/exact difference seen so far
        self.margin = margin if margin is not None else 0.0

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Scores one padded batch with the fast engine."""
        return self.fast.infer(feeds)

    def warm(
        self, feeds: Mapping[str, np.ndarray], stop: threading.Event | None = None
    ) -> np.ndarray:
        """A warm-up batch on the fast engine, as `infer` (cancelled as that engine can)."""
        return self.fast.warm(feeds, stop)

    def alone(self) -> LoneBatch | None:
        """The fast engine's way to score a batch alone on every core."""
        return self.fast.alone()

    def refinement(self) -> Refinement:
        """The fast and exact stages and the current margin."""
        return Refinement(self.fast, self.exact, self.margin)

    def describe(self) -> dict[str, Any] | None:
        """The fast backend's description (the one that runs every batch)."""
        return self.fast.describe()

    def warmup(self, stop: threading.Event | None = None) -> None:
        """Warms both engines (a chained exact one first, calibrating its own margin); unless a
        margin was given, calibrates this one on the warm-up shapes. No batch runs after `stop`
        is set."""
        if self.exact.refinement() is not None:
            self.exact.warmup(stop)
        self._measure(
            [
                synthetic_feeds(rows, tokens, self.input_names, self.pad_token_id)
                for rows, tokens in WARMUP_SHAPES
            ],
            "warm-up",
            stop,
        )

    def calibrate(
        self, text: Sequence[Mapping[str, np.ndarray]], stop: threading.Event | None = None
    ) -> None:
        """Widens the margin (unless it was given) to the largest fast/exact difference on these
        batches of real text too; a chained exact scorer calibrates first."""
        self.exact.calibrate(text, stop)
        self._measure(text, "probe-set text", stop)

    def _measure(
        self,
        batches: Sequence[Mapping[str, np.ndarray]],
        what: str,
        stop: threading.Event | None,
    ) -> None:
        scores = self._on_workers(batches, stop)
        worst = max((float(np.abs(fast - exact).max()) for exact, fast in scores), default=0.0)
        # The fast engine's lone-batch path (every core) counts in the margin too; it runs
        # after the rest, alone on the model, as served.
        alone = self.fast.alone()
        if alone is not None:
            for feeds, (exact, _) in zip(batches, scores, strict=True):
                worst = max(worst, float(np.abs(alone(feeds, stop) - exact).max()))
        self._measured = max(self._measured, worst)
        if self._fixed_margin is None:
            self.margin = self._margin_factor * self._measured
        logger.info(
            "refining scorer: fast/exact max |diff| %.3g on %s, margin %.3g",
            worst,
            what,
            self.margin,
        )

    def _on_workers(
        self, batches: Sequence[Mapping[str, np.ndarray]], stop: threading.Event | None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each batch's (exact, fast) scores, the passes run as many at once as both engines
        take (a core each on CPU, as the batcher runs them), the largest batches first;
        cancelled once `stop` is set (`Scorer.warm`)."""
        workers = max(1, min(self.fast.parallelism, self.exact.parallelism))
        order = sorted(range(len(batches)), key=lambda i: -batches[i]["input_ids"].size)
        with ThreadPoolExecutor(workers, thread_name_prefix="cappy-calibrate") as pool:
            passes = {
                i: (
                    pool.submit(self.exact.warm, batches[i], stop),
                    pool.submit(self.fast.warm, batches[i], stop),
                )
                for i in order
            }
            return [(exact.result(), fast.result()) for _, (exact, fast) in sorted(passes.items())]


def load_scorer(
    export_dir: ExportDir,
    device: Device = "auto",
    engine: Engine = "auto",
    precision: Precision = "auto",
    *,
    threads: int | None = None,
    streams: int | None = None,
    refine: bool = True,
    tensorrt: bool = False,
    trt_cache: str | None = None,
) -> Scorer:
    """Builds the fastest faithful scorer for this machine.

    GPU: ONNX Runtime CUDA with the fp16 graph (fp32 when the export has no usable fp16), on
    `streams` sessions (default 2) so that batches overlap; `tensorrt` puts TensorRT fp16 first.
    CPU: OpenVINO bf16 where the CPU computes bf16 natively, wrapped (unless `refine` is False)
    in a `RefiningScorer` whose fp32 twin re-scores near-tied leaders of a candidate set; else
    ONNX Runtime fp32. With precision int8 and an export holding a calibrated OpenVINO int8
    model, that model screens first: int8 -> bf16 -> fp32, each stage re-scoring the previous
    one's near-ties (the int8 margin is the export's measured int8 parity error). Measured on the
    MiniLM benchmark (loadtests/engine_bench.py): OpenVINO bf16 ~2x the pairs/s of any fp32
    engine, argmax agreement with PyTorch fp32 97% alone and 100% refined; ONNX Runtime int8 was
    slower and 71% faithful. `streams` on CPU: OpenVINO streams (1: LATENCY, every thread on each
    batch; None: THROUGHPUT, OpenVINO picks the count).

    Raises:
        ScorerError / ExportDirError: an impossible combination (e.g. fp16 on CPU, bf16 on ORT).
    """
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
        if device == "cpu" and cuda_provider_built():
            # The GPU image on a host without a GPU (or without the NVIDIA runtime): it serves.
            logger.info("ONNX Runtime has the CUDA provider but sees no GPU: serving on the CPU")
    pad = _pad_id(export_dir)
    common: GraphInputs = {
        "input_names": export_dir.input_names,
        "pad_token_id": pad,
        "output_name": export_dir.output_name,
    }
    if device == "cuda":
        if engine == "openvino":
            raise ScorerError("the OpenVINO scorer runs on CPU only")
        if precision == "auto":
            precision = "fp16" if export_dir.has_variant("fp16") else "fp32"
        if precision not in ("fp16", "fp32"):
            raise ScorerError(f"precision {precision} is not served on GPU (fp16 or fp32)")
        return OnnxScorer(
            export_dir.model_path(precision),
            device="cuda",
            precision=precision,
            sessions=streams,
            tensorrt=tensorrt,
            trt_cache=trt_cache,
            **common,
        )
    if tensorrt:
        raise ScorerError("TensorRT runs on CUDA GPUs only (device cuda)")

    chosen_automatically = engine == "auto"
    # Opt-in: on the flat-scored MiniLM benchmark the int8 screen's honest margin (its parity
    # error) sent a third of the pairs on to bf16, slower than bf16 alone.
    # Shipped is enough here: an ungated one is then refused by model_path with the reason.
    screen = precision == "int8" and "openvino-int8" in export_dir.manifest.models
    if engine == "auto":
        if screen and openvino_importable():
            engine = "openvino"
        elif precision in ("auto", "bf16") and openvino_importable() and openvino_bf16_supported():
            engine, precision = "openvino", "bf16"
        else:
            engine = "onnxruntime"
    if engine == "openvino" and screen:
        return _screened_scorer(export_dir, threads, streams, refine, common)
    if engine == "openvino" and chosen_automatically:
        try:
            return _openvino_scorer(export_dir, precision, threads, streams, refine, common)
        except Exception as exc:  # e.g. a graph op OpenVINO cannot read: ORT still can
            logger.warning("OpenVINO cannot serve this export (%s); using ONNX Runtime fp32", exc)
            engine, precision = "onnxruntime", "fp32"
    if engine == "openvino":
        precision = openvino_precision(precision)
        if precision not in ("bf16", "fp32"):
            raise ScorerError(
                f"the OpenVINO scorer runs bf16 or fp32, or int8 from an export made with "
                f"--int8-calibration; not {precision} here"
            )
        return _openvino_scorer(export_dir, precision, threads, streams, refine, common)
    if precision == "auto":
        precision = "fp32"
    if precision in ("bf16", "fp16"):
        raise ScorerError(f"ONNX Runtime on CPU serves fp32 or int8, not {precision}")
    return OnnxScorer(
        export_dir.model_path(precision),
        device="cpu",
        precision=precision,
        threads=threads,
        **common,
    )


def _streamed_scorer(
    model: Path,
    precision: str,
    threads: int | None,
    streams: int | None,
    common: GraphInputs,
    *,
    pinned: bool = True,
    alone: bool = False,
) -> OpenVinoScorer:
    """The OpenVINO scorer the batcher drives. One stream: every thread on each batch (lowest
    latency). Otherwise several batches at once, the threads split between them; unset lets
    OpenVINO's throughput hint pick the count.

    `pinned=False` is for a model that runs in turn with the main one on the same workers (a
    re-scoring stage): OpenVINO pins a model's busy stream to a core of its own choosing, the
    same core for every compiled model, so a re-scoring call beside one running batch shared
    that batch's core while the other core idled (both ~50% slower). Left
    to the OS, its thread runs on the free core."""
    hint = "LATENCY" if streams == 1 else "THROUGHPUT"
    return OpenVinoScorer(
        model,
        precision=precision,
        threads=threads,
        hint=hint,
        num_streams=streams,
        extra_config=None if pinned else {"ENABLE_CPU_PINNING": False},
        alone=alone,
        **common,
    )


def _openvino_scorer(
    export_dir: ExportDir,
    precision: str,
    threads: int | None,
    streams: int | None,
    refine: bool,
    common: GraphInputs,
    *,
    pinned: bool = True,
) -> Scorer:
    model = export_dir.model_path("fp32")
    # The batcher's scorer: a lone batch it cannot split runs on every core.
    scorer = _streamed_scorer(model, precision, threads, streams, common, pinned=pinned, alone=True)
    if refine and scorer.precision == "bf16":
        # Compiled like the fast scorer (one stream per batch worker) because the runtime runs
        # the re-scoring on the batcher's workers, in turn with the batches: served, that
        # measured +9% pairs/s over a latency-mode twin using every core beside the streams.
        # Unpinned: see _streamed_scorer.
        exact = _streamed_scorer(model, "fp32", threads, streams, common, pinned=False)
        return RefiningScorer(scorer, exact)
    return scorer


def _screened_scorer(
    export_dir: ExportDir,
    threads: int | None,
    streams: int | None,
    refine: bool,
    common: GraphInputs,
) -> Scorer:
    """The export's calibrated OpenVINO int8 model screens every candidate; unless `refine` is
    False, the leaders within its recorded parity error of the best are re-scored by the bf16
    scorer (itself refined by fp32): int8 -> bf16 -> fp32."""
    model = export_dir.model_path("openvino-int8")
    int8 = _streamed_scorer(model, "int8", threads, streams, common)
    if not refine:
        return int8
    record = export_dir.parity("openvino-int8")
    if record is None or record.max_abs_diff is None:
        raise ScorerError(
            f"{export_dir.path}: the openvino-int8 model has no measured parity to set its "
            "re-scoring margin; re-export it, or serve with precision bf16"
        )
    bf16 = _openvino_scorer(export_dir, "bf16", threads, streams, refine, common, pinned=False)
    return RefiningScorer(int8, bf16, margin=record.max_abs_diff)


def _pad_id(export_dir: ExportDir) -> int:
    if export_dir.manifest.pad_token_id is not None:
        return export_dir.manifest.pad_token_id
    from service.engine.tokenize import PairTokenizer

    try:
        return PairTokenizer.from_dir(
            export_dir.path, max_length=export_dir.max_length, with_token_type_ids=False
        ).pad_token_id
    except Exception as exc:
        raise ExportDirError(f"{export_dir.path}: cannot find the pad token id ({exc})") from exc
