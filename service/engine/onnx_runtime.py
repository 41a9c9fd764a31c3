"""The ONNX Runtime backend: CUDA execution provider (optionally TensorRT first) on a GPU, the CPU
provider otherwise.

On a GPU the scorer keeps several batches in flight. It holds `sessions` InferenceSessions of the
same graph, each with its own CUDA execution provider and so its own CUDA stream, and a worker
thread drives each (the batcher runs `parallelism` batches at once). While one session's kernels
run, another thread pads and copies its batch, and the copy engine moves it to the device from
page-locked host buffers (`host_buffers`), so tokenization, padding and transfers overlap the
kernels instead of sitting between them. Inputs are bound as OrtValues over those buffers (IO
binding) and the one small output (one float per row) is copied back at the end of the run.

CUDA graphs are not used: they need fixed shapes and addresses, and the batcher's shapes vary
with every batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Unpack

import numpy as np

from service.engine.errors import EngineStopped, ScorerError
from service.engine.host_buffers import HostBuffers, host_buffers_for
from service.engine.types import STOP_POLL_S, GraphInputs, Scorer, stop_if_asked
from service.engine.warmup import WARMUP_SHAPES, synthetic_feeds

logger = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
# Sessions (each its own CUDA stream) when none are asked for: two keep the GPU fed while the
# other's batch is prepared; more only multiply the weights held in device memory.
DEFAULT_CUDA_SESSIONS = 2


def usable_cores() -> int:
    """CPU cores this process may run on (cgroup/affinity aware where the OS says so)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def preload_cuda_libraries(ort: Any) -> None:
    """Loads the CUDA and cuDNN libraries of the nvidia-* wheels (the `gpu` extra's
    onnxruntime-gpu[cuda,cudnn]) before the CUDA provider needs them, so that a pip install works
    without a system CUDA toolkit. A failure is only logged: the libraries may come from the
    system instead, and the session then says whether CUDA is usable."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:  # onnxruntime < 1.21
        return
    try:
        preload()
    except Exception as exc:
        logger.warning(
            "onnxruntime.preload_dlls() failed (%s); relying on system CUDA libraries", exc
        )


def cuda_provider_built() -> bool:
    """Whether this ONNX Runtime has the CUDA provider (onnxruntime-gpu), GPU or not."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return CUDA_PROVIDER in ort.get_available_providers()


def cuda_available() -> bool:
    """Whether ONNX Runtime can use a CUDA GPU here."""
    if not cuda_provider_built():
        return False
    # The provider is compiled in even on machines without a GPU; ask the driver.
    try:
        import ctypes

        libcuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        return (
            libcuda.cuInit(0) == 0
            and libcuda.cuDeviceGetCount(ctypes.byref(count)) == 0
            and count.value > 0
        )
    except OSError:
        return False


def _cuda_providers(
    device_id: int, tensorrt: bool, available: Sequence[str], trt_cache: str | None
) -> list[Any]:
    providers: list[Any] = []
    if tensorrt:
        if TENSORRT_PROVIDER not in available:
            raise ScorerError(
                f"TensorRT was asked for but ONNX Runtime has no {TENSORRT_PROVIDER} "
                f"(available: {', '.join(available)})"
            )
        options: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": True}
        if trt_cache:  # engines are built per shape profile: keep them between starts
            options.update(trt_engine_cache_enable=True, trt_engine_cache_path=trt_cache)
        providers.append((TENSORRT_PROVIDER, options))
    providers.append(
        (
            CUDA_PROVIDER,
            {
                "device_id": device_id,
                "arena_extend_strategy": "kSameAsRequested",
                "cudnn_conv_algo_search": "HEURISTIC",
                # Copies on the session's own stream: on the legacy default stream they would
                # wait for, and hold up, every other session's kernels.
                "do_copy_in_default_stream": False,
            },
        )
    )
    providers.append(CPU_PROVIDER)
    return providers


@dataclass
class _Slot:
    """One session with its reusable IO binding and host buffers; one thread uses it at a time."""

    session: Any
    binding: Any | None
    buffers: HostBuffers | None


class OnnxScorer(Scorer):
    """ONNX Runtime backend.

    Args:
        model_path: the ONNX graph (model.onnx, model.fp16.onnx, model.int8.onnx).
        device: "cuda" (the CUDA provider, IO binding from pinned buffers) or "cpu".
        precision: the graph's precision, for the name only.
        threads: CPU intra-op threads (CPU only; default every usable core).
        sessions: sessions of the graph, each run by its own worker thread (on CUDA each has its
            own stream); default 2 on CUDA, 1 on CPU (where one session uses every core).
        io_binding: bind inputs as OrtValues over reusable host buffers instead of passing numpy
            feeds; default on for CUDA. On CPU it runs the same path without pinned memory.
        tensorrt: put the TensorRT provider (fp16) before CUDA; ScorerError if it is missing.
        trt_cache: where TensorRT keeps its built engines.

    Attributes:
        name: e.g. "onnxruntime-cuda-fp16" or "onnxruntime-cpu-fp32".
        providers: the providers the sessions actually use.
        parallelism: batches that may run at once (the session count).
        pinned: whether inputs are copied from page-locked host memory.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: Literal["cuda", "cpu"] = "cpu",
        precision: str = "fp32",
        threads: int | None = None,
        device_id: int = 0,
        sessions: int | None = None,
        io_binding: bool | None = None,
        tensorrt: bool = False,
        trt_cache: str | None = None,
        **graph: Unpack[GraphInputs],
    ) -> None:
        import onnxruntime as ort

        self.input_names = list(graph["input_names"])
        self.pad_token_id = graph["pad_token_id"]
        self.output_name = graph.get("output_name", "logits")
        self.device = device
        self.precision = precision
        self.name = f"onnxruntime-{device}-{precision}"
        count = sessions or (DEFAULT_CUDA_SESSIONS if device == "cuda" else 1)
        if count < 1:
            raise ScorerError(f"sessions must be at least 1, not {count}")
        self.parallelism = count
        self._bind = device == "cuda" if io_binding is None else io_binding
        self._device_id = device_id

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        if device == "cpu":
            if tensorrt:
                raise ScorerError("TensorRT runs on CUDA GPUs only")
            # The cores are shared between the sessions.
            options.intra_op_num_threads = max(1, (threads or usable_cores()) // count)
            options.inter_op_num_threads = 1
            # Idle intra-op threads otherwise spin for a while after each run, taking CPU from the
            # event loop and the tokenizer between batches on a small machine.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            providers: list[Any] = [CPU_PROVIDER]
        else:
            preload_cuda_libraries(ort)
            providers = _cuda_providers(
                device_id, tensorrt, list(ort.get_available_providers()), trt_cache
            )
        slots = [
            ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
            for _ in range(count)
        ]
        self.providers = list(slots[0].get_providers())
        if device == "cuda" and CUDA_PROVIDER not in self.providers:
            raise ScorerError(f"CUDA execution provider not available (got {self.providers})")
        if tensorrt and self.providers[0] != TENSORRT_PROVIDER:
            raise ScorerError(f"TensorRT execution provider not available (got {self.providers})")
        graph_inputs = {i.name for i in slots[0].get_inputs()}
        missing = [n for n in self.input_names if n not in graph_inputs]
        if missing:
            raise ScorerError(f"{model_path}: graph has no inputs {missing}")
        self._ort = ort
        self._slots: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self.pinned = False
        for session in slots:
            buffers = host_buffers_for(device, self.input_names) if self._bind else None
            self.pinned = buffers is not None and buffers.pinned
            binding = session.io_binding() if self._bind else None
            self._slots.put(_Slot(session, binding, buffers))
        logger.info(
            "ONNX Runtime scorer %s on %s from %s: %d session(s), io binding %s, pinned %s",
            self.name,
            self.providers,
            model_path,
            count,
            self._bind,
            self.pinned,
        )

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Scores one padded batch on a free session; returns logits[:, 0] as float32."""
        return self._on_free_slot(feeds, None)

    def warm(
        self, feeds: Mapping[str, np.ndarray], stop: threading.Event | None = None
    ) -> np.ndarray:
        """`infer`, terminated (`EngineStopped`) as soon as `stop` is set."""
        with self._terminated_on(stop) as options:
            return self._on_free_slot(feeds, options)

    def _on_free_slot(self, feeds: Mapping[str, np.ndarray], options: Any) -> np.ndarray:
        slot = self._slots.get()
        try:
            return self._infer_on(slot, feeds, options)
        finally:
            self._slots.put(slot)

    @contextlib.contextmanager
    def _terminated_on(self, stop: threading.Event | None) -> Iterator[Any]:
        """Run options for the runs inside: None without `stop`; with it, options whose
        `terminate` flag is raised within `STOP_POLL_S` of `stop` being set (ONNX Runtime then
        fails the run between two nodes), and that failure raised as `EngineStopped`."""
        if stop is None:
            yield None
            return
        stop_if_asked(stop)
        options, done = self._ort.RunOptions(), threading.Event()

        def watch() -> None:
            while not done.wait(STOP_POLL_S):
                if stop.is_set():
                    options.terminate = True
                    return

        watcher = threading.Thread(target=watch, name="cappy-warmup-stop", daemon=True)
        watcher.start()
        try:
            yield options
        except Exception as exc:
            if stop.is_set():
                raise EngineStopped("the scorer's start-up was stopped") from exc
            raise
        finally:
            done.set()
            watcher.join()

    def _infer_on(
        self, slot: _Slot, feeds: Mapping[str, np.ndarray], options: Any = None
    ) -> np.ndarray:
        if slot.binding is None:
            (logits,) = slot.session.run(
                [self.output_name], {name: feeds[name] for name in self.input_names}, options
            )
        else:
            logits = self._run_bound(slot, feeds, options)
        return np.asarray(logits, dtype=np.float32).reshape(logits.shape[0], -1)[:, 0].copy()

    def _run_bound(
        self, slot: _Slot, feeds: Mapping[str, np.ndarray], options: Any = None
    ) -> np.ndarray:
        assert slot.binding is not None and slot.buffers is not None
        binding = slot.binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, view in slot.buffers.fill(feeds).items():
            binding.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy(view))
        # Bound to host memory: ORT copies the (rows x 1) output back on the session's stream
        # and synchronises once, at the end of the run.
        binding.bind_output(self.output_name, "cpu")
        slot.session.run_with_iobinding(binding, options)
        return np.asarray(binding.copy_outputs_to_cpu()[0])

    def describe(self) -> dict[str, Any]:
        """What /info reports of this backend."""
        return {
            "providers": self.providers,
            "sessions": self.parallelism,
            "io_binding": self._bind,
            "pinned_inputs": self.pinned,
        }

    def warmup(self, stop: threading.Event | None = None) -> None:
        """Runs batches of representative shapes once on every session (each selects its
        kernels on its own first shapes); terminated once `stop` is set."""
        slots = [self._slots.get() for _ in range(self.parallelism)]
        try:
            with self._terminated_on(stop) as options:
                for slot in slots:
                    for rows, tokens in WARMUP_SHAPES:
                        stop_if_asked(stop)
                        feeds = synthetic_feeds(rows, tokens, self.input_names, self.pad_token_id)
                        self._infer_on(slot, feeds, options)
        finally:
            for slot in slots:
                self._slots.put(slot)
