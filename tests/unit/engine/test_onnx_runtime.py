"""The ONNX Runtime backend: IO binding through the CPU provider, several sessions in flight, the
CUDA branch of `load_scorer` driven through a stand-in ONNX Runtime (a real CPU session that
reports the providers a GPU build would), the fp16 graph on the CPU provider, and the real CUDA
run where a GPU is present."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pytest

from service.engine import host_buffers
from service.engine.errors import ScorerError
from service.engine.export_dir import ExportDir
from service.engine.onnx_runtime import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    TENSORRT_PROVIDER,
    OnnxScorer,
    cuda_available,
    preload_cuda_libraries,
)
from service.engine.scorer import load_scorer
from tests.unit.engine.conftest import assert_close, common, pytorch_cases
from tests.unit.engine.test_host_buffers import FakeCudart


class StandInSession:
    """A real CPU InferenceSession that says it runs on the providers a GPU build would use."""

    def __init__(self, ort: Any, path: str, sess_options: Any, providers: list[Any], fake: Any):
        self._real = ort.InferenceSession(path, sess_options=sess_options, providers=[CPU_PROVIDER])
        self.requested = providers
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        self._providers = [n for n in names if n in fake.available]
        fake.sessions.append(self)

    def get_providers(self) -> list[str]:
        return self._providers

    def __getattr__(self, name: str) -> Any:  # run, get_inputs, io_binding, run_with_iobinding
        return getattr(self._real, name)


def stand_in_onnxruntime(available: list[str]) -> SimpleNamespace:
    import onnxruntime as ort

    fake = SimpleNamespace(
        available=available,
        sessions=[],
        preloaded=0,
        SessionOptions=ort.SessionOptions,
        GraphOptimizationLevel=ort.GraphOptimizationLevel,
        ExecutionMode=ort.ExecutionMode,
        OrtValue=ort.OrtValue,
    )
    fake.get_available_providers = lambda: list(available)

    def preload() -> None:
        fake.preloaded += 1

    fake.preload_dlls = preload
    fake.InferenceSession = lambda path, sess_options=None, providers=None: StandInSession(
        ort, path, sess_options, providers or [], fake
    )
    return fake


@pytest.fixture
def gpu_build(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """ONNX Runtime as a GPU build with CUDA (and TensorRT) would look, and a CUDA runtime that
    hands out page-locked memory."""
    fake = stand_in_onnxruntime([TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER])
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    cudart = FakeCudart()
    monkeypatch.setattr(host_buffers, "load_cudart", lambda: cudart)
    fake.cudart = cudart
    return fake


def test_io_binding_on_the_cpu_provider_matches_pytorch(export, tokenizer, cases) -> None:
    scorer = OnnxScorer(
        export.model_path("fp32"), device="cpu", io_binding=True, **common(export, tokenizer)
    )
    scorer.warmup()
    assert scorer.describe() == {
        "providers": [CPU_PROVIDER],
        "sessions": 1,
        "io_binding": True,
        "pinned_inputs": False,
    }
    assert_close(scorer, cases, atol=1e-4)
    # Buffers grown for the largest batch are reused by smaller ones: scores are unchanged.
    assert_close(scorer, list(reversed(cases)), atol=1e-4)


def test_sessions_run_batches_at_once_without_mixing_them(export, tokenizer, cases) -> None:
    scorer = OnnxScorer(
        export.model_path("fp32"),
        device="cpu",
        sessions=2,
        io_binding=True,
        threads=2,
        **common(export, tokenizer),
    )
    assert scorer.parallelism == 2
    jobs = [feeds for feeds, _ in cases] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(scorer.infer, jobs))
    for got, (_, expected) in zip(results, cases * 4, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_load_scorer_cuda_branch(gpu_build, export, cases) -> None:
    scorer = load_scorer(export, device="cuda", streams=3)
    assert isinstance(scorer, OnnxScorer)
    assert scorer.name == "onnxruntime-cuda-fp32"  # this export ships no fp16 graph
    assert scorer.device == "cuda" and scorer.parallelism == 3
    assert len(gpu_build.sessions) == 3 and gpu_build.preloaded >= 1
    (cuda_options,) = [p[1] for p in gpu_build.sessions[0].requested if p[0] == CUDA_PROVIDER]
    # Copies on each session's own stream, not the default stream every session would share.
    assert cuda_options["do_copy_in_default_stream"] is False
    assert TENSORRT_PROVIDER not in scorer.providers  # opt-in
    described = scorer.describe()
    assert described["providers"][0] == CUDA_PROVIDER
    assert described["io_binding"] is True and described["pinned_inputs"] is True
    assert_close(scorer, cases, atol=1e-4)  # through the bound, page-locked path
    assert gpu_build.cudart.live  # the inputs went through cudaHostAlloc'd buffers
    assert load_scorer(export, device="cuda").parallelism == 2  # the default


def test_load_scorer_cuda_picks_tensorrt_when_asked(gpu_build, export, tmp_path: Path) -> None:
    scorer = load_scorer(export, device="cuda", tensorrt=True, trt_cache=str(tmp_path))
    assert isinstance(scorer, OnnxScorer)
    assert scorer.providers[:2] == [TENSORRT_PROVIDER, CUDA_PROVIDER]
    name, options = gpu_build.sessions[0].requested[0]
    assert name == TENSORRT_PROVIDER
    assert options["trt_fp16_enable"] is True
    assert options["trt_engine_cache_path"] == str(tmp_path)
    assert scorer.describe()["providers"][0] == TENSORRT_PROVIDER


def test_load_scorer_cuda_errors(monkeypatch: pytest.MonkeyPatch, export) -> None:
    cpu_build = stand_in_onnxruntime([CPU_PROVIDER])
    monkeypatch.setitem(sys.modules, "onnxruntime", cpu_build)
    with pytest.raises(ScorerError, match="CUDA execution provider not available"):
        load_scorer(export, device="cuda")
    with pytest.raises(ScorerError, match="TensorRT was asked for"):
        load_scorer(export, device="cuda", tensorrt=True)
    with pytest.raises(ScorerError, match="not served on GPU"):
        load_scorer(export, device="cuda", precision="int8")
    with pytest.raises(ScorerError, match="CPU only"):
        load_scorer(export, device="cuda", engine="openvino")
    with pytest.raises(ScorerError, match="TensorRT runs on CUDA"):
        load_scorer(export, device="cpu", engine="onnxruntime", tensorrt=True)


def test_cuda_libraries_are_preloaded_when_onnxruntime_can(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []
    preload_cuda_libraries(SimpleNamespace(preload_dlls=lambda: calls.append("preloaded")))
    assert calls == ["preloaded"]
    preload_cuda_libraries(SimpleNamespace())  # onnxruntime < 1.21: nothing to call

    def broken() -> None:
        raise OSError("libcudnn.so.9: cannot open shared object file")

    preload_cuda_libraries(SimpleNamespace(preload_dlls=broken))  # logged, not raised
    assert "preload_dlls() failed" in caplog.text


def fp16_graph(tiny_export: Path) -> Path:
    path = tiny_export / "model.fp16.onnx"
    if not path.is_file():
        pytest.fail(
            f"the tiny export has no fp16 graph: {sorted(p.name for p in tiny_export.iterdir())}"
        )
    return path


def fp16_cases(tiny_export: Path, tiny_checkpoint: Path) -> tuple[ExportDir, list]:
    """(feeds, PyTorch fp32 scores) for the pipeline-built tiny export (token_type_ids or not)."""
    from transformers import AutoModelForSequenceClassification

    from service.engine.tokenize import PairTokenizer

    export = ExportDir.load(tiny_export, allow_ungated=True)
    tokenizer = PairTokenizer.from_dir(
        export.path,
        max_length=export.max_length,
        with_token_type_ids="token_type_ids" in export.input_names,
    )
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_checkpoint)).eval()
    return export, pytorch_cases(model, tokenizer, export.input_names)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU"),
            ],
        ),
    ],
)
def test_fp16_graph_matches_pytorch(
    device: Literal["cpu", "cuda"], tiny_export: Path, tiny_checkpoint: Path
) -> None:
    """On the CPU provider (through IO binding, as on CUDA) and, with a GPU, on CUDA."""
    export, cases = fp16_cases(tiny_export, tiny_checkpoint)
    pad = export.manifest.pad_token_id
    assert pad is not None
    scorer = OnnxScorer(
        fp16_graph(tiny_export),
        device=device,
        precision="fp16",
        io_binding=True,
        input_names=export.input_names,
        pad_token_id=pad,
    )
    scorer.warmup()
    if device == "cuda":
        assert scorer.providers[0] == CUDA_PROVIDER and scorer.parallelism == 2
    scale = max(float(np.abs(expected).max()) for _, expected in cases)
    # fp16 keeps ~3 decimal digits; through the tiny model's wide random weights (scores up to
    # ~6) the error reaches ~0.5% of the scale: within 1%, far below what a broken graph gives.
    assert_close(scorer, cases, atol=1e-2 * max(1.0, scale))
