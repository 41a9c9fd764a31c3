"""Export -> verify on real small models, parity with PyTorch, and the atomicity of an export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from model_export import manifest as mf
from model_export import onnx_export
from model_export.errors import ExportError
from model_export.pipeline import ExportOptions, export, verify

PAIRS = [
    ("What is 2 + 2?", "4"),
    ("What is 2 + 2?", "The answer is four, because two plus two makes four."),
    ("Name a colour.", ""),
    ("Traduis : bonjour", "hello — 你好 ✓"),
    ("Summarize the text. " * 60, "A long instruction gets truncated. " * 40),
]


def _torch_scores(checkpoint: Path, max_length: int) -> np.ndarray:
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    batch = tokenizer(
        [p[0] for p in PAIRS],
        [p[1] for p in PAIRS],
        truncation="longest_first",
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        return model(**batch).logits[:, 0].numpy()


def _onnx_scores(export_dir: Path, file: str) -> np.ndarray:
    manifest = json.loads((export_dir / mf.MANIFEST).read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    batch = tokenizer(
        [p[0] for p in PAIRS],
        [p[1] for p in PAIRS],
        truncation="longest_first",
        max_length=manifest["max_length"],
        padding=True,
        return_tensors="np",
    )
    session = ort.InferenceSession(str(export_dir / file), providers=["CPUExecutionProvider"])
    feeds = {name: batch[name].astype(np.int64) for name in manifest["inputs"]}
    return session.run(["logits"], feeds)[0][:, 0]


@pytest.mark.parametrize("name", ["tiny", "minilm"])
def test_export_matches_pytorch_and_verifies(name: str, request: pytest.FixtureRequest) -> None:
    export_dir: Path = request.getfixturevalue(f"{name}_export")
    checkpoint: Path = request.getfixturevalue(f"{name}_checkpoint")
    manifest = json.loads((export_dir / mf.MANIFEST).read_text())

    assert manifest["max_length"] == 512
    assert manifest["opset"] == onnx_export.OPSET
    assert manifest["models"]["fp32"]["optimized"] is True
    # The CPU graph runs its last layer for the first token only (ONNX Runtime's attention
    # fusion may then miss some layers); the GPU graph is the plain export, every layer fused.
    assert manifest["models"]["fp32"]["last_layer_first_token_only"] is True
    assert manifest["models"]["fp32"]["fused_operators"].get("SkipLayerNormalization", 0) >= 2
    if "fp16" in manifest["models"]:
        assert manifest["models"]["fp16"]["fused_operators"].get("Attention", 0) >= 2
    assert set(manifest["files"]) >= {"model.onnx", "tokenizer.json", "model.int8.onnx"}
    assert manifest["parity"]["pairs"] >= 64
    fp32 = manifest["parity"]["fp32"]
    assert fp32["status"] == "passed" and fp32["max_abs_diff"] <= 1e-4
    assert fp32["argmax_agreement"] == 1.0
    for variant in ("fp16", "int8"):
        record = manifest["parity"][variant]
        assert record["status"] in {"passed", "not_measured"}
        if record["status"] == "passed":
            assert 0 <= record["argmax_agreement"] <= 1 and record["max_abs_diff"] >= 0
    if "fp16" in manifest["models"]:
        assert manifest["parity"]["fp16"]["argmax_agreement"] >= 0.999

    # Fresh pairs, not the probe set: the served graph equals PyTorch within 1e-4.
    expected = _torch_scores(checkpoint, manifest["max_length"])
    got = _onnx_scores(export_dir, "model.onnx")
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    report = verify(export_dir)
    assert report.ok, report.problems
    assert any(line.startswith("re-measured parity fp32: passed") for line in report.lines)


def test_bert_export_takes_token_type_ids(minilm_export: Path) -> None:
    manifest = json.loads((minilm_export / mf.MANIFEST).read_text())
    assert manifest["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest["architecture"]["model_type"] == "bert"
    assert manifest["pad_token_id"] == 0


def test_roberta_export_has_no_token_type_ids(tiny_export: Path) -> None:
    manifest = json.loads((tiny_export / mf.MANIFEST).read_text())
    assert manifest["inputs"] == ["input_ids", "attention_mask"]
    assert manifest["source"]["kind"] == "local"


@pytest.fixture
def tiny_copy(tiny_export: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    return copy


def test_verify_detects_a_changed_file(tiny_copy: Path) -> None:
    with (tiny_copy / "model.onnx").open("r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    report = verify(tiny_copy)
    assert not report.ok
    assert any("model.onnx: sha256 mismatch" in p for p in report.problems)


def test_verify_detects_a_missing_file(tiny_copy: Path) -> None:
    (tiny_copy / "tokenizer.json").unlink()
    report = verify(tiny_copy, remeasure=False)
    assert report.problems == ["tokenizer.json: missing"]


def test_verify_refuses_recorded_parity_failure(tiny_copy: Path) -> None:
    manifest = json.loads((tiny_copy / mf.MANIFEST).read_text())
    manifest["parity"]["fp32"]["status"] = "failed"
    mf.write(tiny_copy, manifest)
    report = verify(tiny_copy, remeasure=False)
    assert "parity fp32: recorded status 'failed'" in report.problems


def test_verify_refuses_a_directory_without_manifest(tiny_copy: Path) -> None:
    (tiny_copy / mf.MANIFEST).unlink()
    with pytest.raises(ExportError, match="no cappy_export.json"):
        verify(tiny_copy)


def test_verify_skips_remeasure_when_source_is_gone(tiny_copy: Path) -> None:
    manifest = json.loads((tiny_copy / mf.MANIFEST).read_text())
    manifest["source"]["model"] = "/nonexistent/checkpoint"
    mf.write(tiny_copy, manifest)
    report = verify(tiny_copy)
    assert report.ok
    assert any("re-measure: skipped, source not reachable" in line for line in report.lines)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith(".tmp"))


def test_failed_step_leaves_nothing(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx_export, "quantize_int8", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        export(ExportOptions(model=str(tiny_checkpoint), out=out, int8=True, progress=False))
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_interrupted_export_leaves_nothing(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "convert_fp16", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export(ExportOptions(model=str(tiny_checkpoint), out=out, progress=False))
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_optimiser_failure_keeps_the_plain_graph(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise ValueError("fusion pattern not supported")

    monkeypatch.setattr(onnx_export, "optimize", broken)
    out = tmp_path / "plain"
    result = export(ExportOptions(model=str(tiny_checkpoint), out=out, fp16=False, progress=False))
    entry = result.manifest["models"]["fp32"]
    assert entry["optimized"] is False
    assert "fusion pattern not supported" in entry["optimization_error"]
    assert result.manifest["parity"]["fp32"]["status"] == "passed"
    assert verify(out).ok


def test_force_replaces_an_existing_directory(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export(
        ExportOptions(model=str(tiny_checkpoint), out=out, fp16=False, force=True, progress=False)
    )
    assert not (out / "stale.txt").exists()
    assert verify(out, remeasure=False).ok
