"""The OpenVINO backend: OpenVINO's CPU plugin reading the export's model.onnx (or a quantised
IR), computing in bf16 where the CPU has native bf16 (AVX512_BF16 / AMX), f32 otherwise.

Measured on a 2-core AVX512-BF16 machine with the MiniLM export (loadtests/engine_bench.py):
OpenVINO bf16 ~2x the pairs/s of ONNX Runtime or OpenVINO fp32. The choice between backends is
service/engine/scorer.py's `load_scorer`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Unpack

import numpy as np

from service.engine.errors import EngineStopped, ScorerError
from service.engine.onnx_runtime import usable_cores
from service.engine.types import (
    STOP_POLL_S,
    GraphInputs,
    LoneBatch,
    Precision,
    Scorer,
    ScorerDevice,
    stop_if_asked,
)
from service.engine.warmup import WARMUP_SHAPES, synthetic_feeds

logger = logging.getLogger(__name__)


def _decline_openvino_telemetry() -> None:
    """OpenVINO's Python package starts its usage telemetry when it is imported (its model
    converter registers itself), which a server has no use for; on a read-only root it also logs a
    warning when it cannot write its client id. Declined here for this process, as the library's
    own opt-out (`opt_in_out --opt_out`, a consent file in the home directory) would: nothing is
    collected, sent or written."""
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:  # no telemetry package: nothing to decline
        return
    OptInChecker.check = lambda *_args, **_kwargs: ConsentCheckResult.DECLINED


_decline_openvino_telemetry()


# OpenVINO's Python binding sets up its bridge to numpy on first use (a pybind11 call-once inside
# the initialisation of a C++ static). Two threads making their first call at once can deadlock:
# one holds the static's guard and waits for the GIL, the other holds the GIL and waits at the
# guard (a warm-up running on both streams at once hung so). So each scorer makes a first call
# when it is built, under this lock: one at a time in the process, before any caller's threads.
_FIRST_CALLS = threading.Lock()


# Compiled kernels OpenVINO keeps per input shape (an LRU; its default is 5,000). The batcher's
# shapes vary with every batch (rows x width in steps of 8: thousands of them), and each kept
# shape holds memory: with the default a served process grew by ~0.7 MB per new shape, over a GB
# in minutes of varied load without levelling off; with 512 it levels off. A shape seen again
# after eviction costs a few percent more once.
RUNTIME_CACHE_CAPACITY = 512


def openvino_bf16_supported() -> bool:
    """Whether OpenVINO's CPU plugin reports native bf16 on this CPU."""
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # no openvino, or no CPU plugin
        return False


def openvino_precision(precision: Precision) -> Precision:
    """`precision`, with "auto" resolved as the service serves OpenVINO: bf16 where the CPU has
    it natively, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if openvino_bf16_supported() else "fp32"


class OpenVinoScorer(Scorer):
    """OpenVINO CPU backend reading an ONNX graph or an OpenVINO IR, dynamic batch and sequence
    axes.

    Args:
        model_path: the ONNX graph (OpenVINO reads ORT's fused contrib ops too), or the .xml of
            an IR.
        precision: "bf16" (needs native bf16; falls back to f32 with a warning otherwise),
            "fp32", or "int8" for a quantised IR (its other ops in bf16 where native).
        hint: PERFORMANCE_HINT, "LATENCY" (one stream using every core) or "THROUGHPUT".
        num_streams: NUM_STREAMS; None lets the hint decide.
        threads: INFERENCE_NUM_THREADS; None means every usable core.
        cache_dir: OpenVINO's compiled-model cache (faster restarts).
        extra_config: further compile properties, e.g. {"ENABLE_CPU_PINNING": False}.
        alone: with several streams, compile the model once more as one stream on every thread
            (`alone`): for a batch that runs with nothing beside it, such as a lone one-pair
            request, which a single-core stream runs at about half the speed.

    Attributes:
        streams: the compiled stream count; `parallelism` batches may run at once.
        pinned: whether OpenVINO pins each busy stream's threads to cores.

    The defaults (LATENCY: one stream on every core) suit a lone caller such as engine_bench;
    the service asks for its streams (`CAPPY_STREAMS`), and its batcher spreads a lone request
    over the idle ones. Static shapes measured within noise (+-5%) on 2 cores; batch widths in
    steps (fewer distinct shapes) are the batcher's `pad_to_multiple`.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        precision: str = "bf16",
        hint: str = "LATENCY",
        num_streams: int | None = None,
        threads: int | None = None,
        cache_dir: str | None = None,
        extra_config: Mapping[str, Any] | None = None,
        alone: bool = False,
        **graph: Unpack[GraphInputs],
    ) -> None:
        import openvino as ov

        if precision not in ("bf16", "fp32", "int8"):
            raise ScorerError(
                f"OpenVINO scorer precision must be bf16, fp32 or int8, not {precision!r}"
            )
        native_bf16 = openvino_bf16_supported()
        if precision == "bf16" and not native_bf16:
            logger.warning("this CPU has no native bf16: OpenVINO runs f32 instead")
            precision = "fp32"
        self.input_names = list(graph["input_names"])
        self.pad_token_id = graph["pad_token_id"]
        self.output_name = graph.get("output_name", "logits")
        self.precision = precision
        self.device: ScorerDevice = "cpu"
        self.name = f"openvino-cpu-{precision}"

        core = ov.Core()
        if cache_dir:
            core.set_property({"CACHE_DIR": cache_dir})
        model = core.read_model(str(model_path))
        # An int8 model (quantised IR) keeps its non-quantised ops in bf16 where that is native.
        uses_bf16 = precision == "bf16" or (precision == "int8" and native_bf16)
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if uses_bf16 else "f32",
            "PERFORMANCE_HINT": hint,
            "INFERENCE_NUM_THREADS": threads or usable_cores(),
            "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE_CAPACITY,
        }
        if num_streams is not None:
            config["NUM_STREAMS"] = num_streams
        config.update(extra_config or {})
        self._compiled = core.compile_model(model, "CPU", config)
        self.streams = int(self._compiled.get_property("NUM_STREAMS"))
        self.pinned = bool(self._compiled.get_property("ENABLE_CPU_PINNING"))
        # Batches that may run at once: one per stream (the batcher splits a lone request's
        # pairs across idle streams).
        self.parallelism = max(1, self.streams)
        self._output = self._compiled.output(self.output_name)
        # One request per stream, handed out through a queue so concurrent callers never share one.
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(max(1, self.streams)):
            self._requests.put(self._compiled.create_infer_request())
        # A batch that runs alone on the model gets every thread: the same model compiled once
        # more for latency (one stream), where the streams take a core each.
        self._alone: Any = None
        if alone and self.streams > 1:
            compiled = core.compile_model(
                model, "CPU", {**config, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
            )
            self._alone = (compiled.create_infer_request(), compiled.output(self.output_name))
        # The binding's first call (see _FIRST_CALLS), on a batch of 8 tokens, before any
        # caller's threads can make theirs.
        with _FIRST_CALLS:
            self.infer(synthetic_feeds(1, 8, self.input_names, self.pad_token_id))
        logger.info(
            "OpenVINO scorer %s from %s: hint %s, %d stream(s), %s threads",
            self.name,
            model_path,
            hint,
            self.streams,
            self._compiled.get_property("INFERENCE_NUM_THREADS"),
        )

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Scores one padded batch; returns logits[:, 0] as float32."""
        return self.warm(feeds)

    def warm(
        self, feeds: Mapping[str, np.ndarray], stop: threading.Event | None = None
    ) -> np.ndarray:
        """`infer`, cancelled (`EngineStopped`) as soon as `stop` is set."""
        request = self._requests.get()
        try:
            return self._run(request, self._output, feeds, stop)
        finally:
            self._requests.put(request)

    def _run(
        self,
        request: Any,
        output: Any,
        feeds: Mapping[str, np.ndarray],
        stop: threading.Event | None = None,
    ) -> np.ndarray:
        """One infer request on `feeds`; logits[:, 0] of `output` as float32. With `stop`, the
        request runs asynchronously and is cancelled within `STOP_POLL_S` of `stop` being set
        (OpenVINO's CPU plugin stops a cancelled request between the graph's nodes; a
        synchronous `infer` runs to its end)."""
        inputs = {name: feeds[name] for name in self.input_names}
        if stop is None:
            request.infer(inputs)
        else:
            stop_if_asked(stop)
            request.start_async(inputs)
            while not request.wait_for(round(STOP_POLL_S * 1000)):
                if stop.is_set():
                    request.cancel()
                    with contextlib.suppress(RuntimeError):  # "Infer Request was canceled"
                        request.wait()
                    raise EngineStopped("the scorer's start-up was stopped")
        logits = request.get_tensor(output).data
        return np.asarray(logits[:, 0], dtype=np.float32).copy()

    def alone(self) -> LoneBatch | None:
        """Scores a batch with every thread, when compiled with `alone` and several streams."""
        return None if self._alone is None else self._infer_alone

    def _infer_alone(
        self, feeds: Mapping[str, np.ndarray], stop: threading.Event | None = None
    ) -> np.ndarray:
        request, output = self._alone
        return self._run(request, output, feeds, stop)

    def describe(self) -> dict[str, Any]:
        """What /info reports of this backend."""
        return {"streams": self.streams, "pinned": self.pinned, "alone": self._alone is not None}

    def warmup(self, stop: threading.Event | None = None) -> None:
        """Runs batches of representative shapes once, as many at once as there are streams
        (largest first), then on the model for lone batches; cancelled once `stop` is set."""
        batches = [
            synthetic_feeds(rows, tokens, self.input_names, self.pad_token_id)
            for rows, tokens in sorted(WARMUP_SHAPES, key=lambda shape: -shape[0] * shape[1])
        ]
        with ThreadPoolExecutor(self.parallelism, thread_name_prefix="cappy-warmup") as pool:
            list(pool.map(partial(self.warm, stop=stop), batches))
        if self._alone is not None:
            for feeds in batches:
                self._infer_alone(feeds, stop)


def openvino_importable() -> bool:
    """Whether OpenVINO is installed (the cpu extra; a GPU install has none)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True
