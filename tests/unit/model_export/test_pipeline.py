"""Exports of real small models: parity with PyTorch (verified), the gates path by path, and the
atomicity of an export."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from cappy import export_format as fmt
from model_export import onnx_export
from model_export.errors import ExportError
from model_export.pipeline import ExportOptions, ExportResult, export
from model_export.verify import verify

PAIRS = [
    ("What is 2 + 2?", "4"),
    ("What is 2 + 2?", "The answer is four, because two plus two makes four."),
    ("Name a colour.", ""),
    ("Traduis : bonjour", "hello — 你好 ✓"),
    ("Summarize the text. " * 60, "A long instruction gets truncated. " * 40),
]


def _encode(directory: Path, max_length: int, tensors: str) -> Any:
    """PAIRS as one padded batch, the way the service encodes a candidate set."""
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    pairs = ([p[0] for p in PAIRS], [p[1] for p in PAIRS])
    options = {"truncation": "longest_first", "max_length": max_length, "padding": True}
    return tokenizer(*pairs, **options, return_tensors=tensors)


def _torch_scores(checkpoint: Path, max_length: int) -> np.ndarray:
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint)).eval()
    batch = _encode(checkpoint, max_length, "pt")
    with torch.inference_mode():
        return model(**batch).logits[:, 0].numpy()


def _onnx_scores(export_dir: Path, file: str) -> np.ndarray:
    manifest = json.loads((export_dir / fmt.MANIFEST).read_text())
    batch = _encode(export_dir, manifest["max_length"], "np")
    session = ort.InferenceSession(str(export_dir / file), providers=["CPUExecutionProvider"])
    feeds = {name: batch[name].astype(np.int64) for name in manifest["inputs"]}
    return session.run(["logits"], feeds)[0][:, 0]


@pytest.mark.parametrize("name", ["tiny", "minilm"])
def test_export_matches_pytorch_and_verifies(name: str, request: pytest.FixtureRequest) -> None:
    export_dir: Path = request.getfixturevalue(f"{name}_export")
    checkpoint: Path = request.getfixturevalue(f"{name}_checkpoint")
    manifest = json.loads((export_dir / fmt.MANIFEST).read_text())

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
    assert manifest["parity"]["mode"] == "gate"
    fp32 = manifest["parity"]["fp32"]
    assert fp32["status"] == "passed" and fp32["gated"] is True
    assert fp32["max_abs_diff"] <= fp32["threshold_max_abs_diff"]
    assert fp32["threshold_max_abs_diff"] == pytest.approx(1e-4 * max(1, fp32["score_scale"]))
    assert fp32["argmax_agreement"] == 1.0 and fp32["decided_sets"] >= 1
    # Both reduced precisions run on the CPU provider (float32 IO) and pass their gate: every
    # decided set keeps its best candidate, and they really are approximations of fp32.
    for variant in ("fp16", "int8"):
        record = manifest["parity"][variant]
        assert record["status"] == "passed", record["reason"]
        assert record["gated"] is True and variant in manifest["models"]
        assert record["decided_sets"] >= 1 and record["argmax_agreement"] == 1.0
        assert record["decided_sets"] + record["near_tie_sets"] == record["candidate_sets"]
        assert record["max_abs_diff"] > fp32["max_abs_diff"]
        assert record["threshold_argmax_agreement"] == 0.999

    # Fresh pairs, not the probe set: the served graph equals PyTorch within 1e-4.
    expected = _torch_scores(checkpoint, manifest["max_length"])
    got = _onnx_scores(export_dir, "model.onnx")
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    report = verify(export_dir)
    assert report.ok, report.problems
    assert any(line.startswith("re-measured parity fp32: passed") for line in report.lines)


def test_bert_export_takes_token_type_ids(minilm_export: Path) -> None:
    manifest = json.loads((minilm_export / fmt.MANIFEST).read_text())
    assert manifest["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert manifest["architecture"]["model_type"] == "bert"
    assert manifest["pad_token_id"] == 0


def test_roberta_export_has_no_token_type_ids(tiny_export: Path) -> None:
    manifest = json.loads((tiny_export / fmt.MANIFEST).read_text())
    assert manifest["inputs"] == ["input_ids", "attention_mask"]
    assert manifest["source"]["kind"] == "local"


def _export(checkpoint: Path, out: Path, **options: Any) -> ExportResult:
    """`export` of a test checkpoint, quietly."""
    return export(ExportOptions(model=str(checkpoint), out=out, progress=False, **options))


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith(".tmp"))


def _raises(error: BaseException) -> Callable[..., NoReturn]:
    """A stand-in for an export step that fails with `error`."""

    def broken(*_args: object, **_kwargs: object) -> NoReturn:
        raise error

    return broken


@pytest.mark.parametrize(
    ("step", "error", "options"),
    [
        ("quantize_int8", RuntimeError("disk full"), {"int8": True}),
        ("convert_fp16", KeyboardInterrupt(), {}),
    ],
    ids=["failed-step", "interrupted"],
)
def test_a_failed_or_interrupted_export_leaves_nothing(
    step: str,
    error: BaseException,
    options: dict[str, Any],
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(onnx_export, step, _raises(error))
    out = tmp_path / "out"
    with pytest.raises(type(error), match=re.escape(str(error)) or None):
        _export(tiny_checkpoint, out, **options)
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_optimiser_failure_keeps_the_plain_graph(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        onnx_export, "optimize", _raises(ValueError("fusion pattern not supported"))
    )
    out = tmp_path / "plain"
    result = _export(tiny_checkpoint, out, fp16=False)
    entry = result.manifest["models"]["fp32"]
    assert entry["optimized"] is False
    assert "fusion pattern not supported" in entry["optimization_error"]
    assert result.manifest["parity"]["fp32"]["status"] == "passed"
    assert verify(out).ok


def test_force_replaces_an_existing_directory(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    _export(tiny_checkpoint, out, fp16=False, force=True)
    assert not (out / "stale.txt").exists()
    assert verify(out, remeasure=False).ok


# --- The parity gates, path by path -------------------------------------------------------------


def _perturb_weights(path: Path, factor: float = 1.05) -> None:
    """Scales every float weight matrix of an ONNX file: a graph that no longer matches PyTorch."""
    model = onnx.load(str(path))
    for initializer in model.graph.initializer:
        array = numpy_helper.to_array(initializer)
        if array.dtype == np.float32 and array.ndim >= 2:
            initializer.CopyFrom(numpy_helper.from_array(array * factor, initializer.name))
    onnx.save(model, str(path))


def _negate_scores(path: Path) -> None:
    """Appends a Neg to the graph's output: every candidate set's ranking reversed."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        node.output[:] = ["logits_raw" if name == "logits" else name for name in node.output]
    model.graph.node.append(onnx.helper.make_node("Neg", ["logits_raw"], ["logits"]))
    onnx.save(model, str(path))


def _damaging(
    monkeypatch: pytest.MonkeyPatch, step: str, damage: Callable[[Path], None], arg: int
) -> None:
    """onnx_export's `step`, then `damage` on the path it wrote (its positional argument `arg`)."""
    original = getattr(onnx_export, step)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        damage(Path(args[arg]))
        return result

    monkeypatch.setattr(onnx_export, step, wrapped)


@pytest.fixture(scope="module")
def scaled_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny RoBERTa with its regression head x20: scores in the tens (up to ~120)."""
    from tests.support.checkpoints import build_tiny_roberta

    checkpoint = build_tiny_roberta(tmp_path_factory.mktemp("scaled"))
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint))
    with torch.no_grad():
        model.classifier.out_proj.weight.mul_(20)
        model.classifier.out_proj.bias.mul_(20)
    model.save_pretrained(str(checkpoint))
    return checkpoint


def test_scores_in_the_tens_pass_the_relative_fp32_gate(
    scaled_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scaled"
    result = _export(scaled_checkpoint, out, fp16=False)
    record = result.manifest["parity"]["fp32"]
    assert record["status"] == "passed" and record["gated"] is True, record["reason"]
    scale = record["score_scale"]
    assert scale >= 10
    # fp32 rounding grows with the scores: more than the old absolute 1e-4 ...
    assert record["max_abs_diff"] > 1e-4
    # ... and well within 1e-4 of the scale, the threshold recorded as applied.
    assert record["threshold_max_abs_diff"] == pytest.approx(1e-4 * scale)
    assert record["max_abs_diff"] <= record["threshold_max_abs_diff"]
    assert record["max_rel_diff"] == pytest.approx(record["max_abs_diff"] / scale)
    assert record["max_rel_diff"] <= record["threshold_max_rel_diff"] == 1e-4
    report = verify(out)
    assert report.ok, report.problems
    assert any(line.startswith("re-measured parity fp32: passed") for line in report.lines)


def test_a_broken_fp32_graph_fails_and_nothing_is_written(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every fp32 graph (plain and optimised) comes from a perturbed export.
    _damaging(monkeypatch, "export_fp32", _perturb_weights, 3)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"^fp32 parity failed against PyTorch \(max \|diff\|"):
        _export(tiny_checkpoint, out, fp16=False)
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_an_optimised_graph_failing_parity_falls_back_to_the_plain_graph(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _damaging(monkeypatch, "optimize", _perturb_weights, 1)
    out = tmp_path / "out"
    result = _export(tiny_checkpoint, out, fp16=False)
    entry = result.manifest["models"]["fp32"]
    assert entry["optimized"] is False and "fused_operators" not in entry
    assert entry["optimization_error"].startswith("optimised graph failed parity: max |diff|")
    record = result.manifest["parity"]["fp32"]
    assert record["status"] == "passed" and record["gated"] is True
    served = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
    assert "SkipLayerNormalization" not in served  # the plain export, not the fused graph
    assert verify(out).ok


def test_an_fp16_graph_below_its_gate_is_not_shipped(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _damaging(monkeypatch, "convert_fp16", _negate_scores, 1)
    out = tmp_path / "out"
    result = _export(tiny_checkpoint, out)
    manifest = result.manifest
    assert sorted(manifest["models"]) == ["fp32"]
    assert not (out / "model.fp16.onnx").exists() and "model.fp16.onnx" not in manifest["files"]
    record = manifest["parity"]["fp16"]  # the figures stay on record
    assert record["status"] == "failed" and record["gated"] is False
    assert record["decided_sets"] >= 1 and record["argmax_agreement"] < 0.999
    assert record["reason"].startswith("argmax agreement")
    assert verify(out).ok


def test_an_unmeasured_variant_ships_ungated_and_is_not_served_silently(
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from service.engine.export_dir import ExportDir, ExportDirError

    original = onnx_export.ort_runner

    def runner(path: Path, provider: str = "CPUExecutionProvider") -> Any:
        if path.name == "model.fp16.onnx":
            raise RuntimeError("no kernel for this fp16 graph\nstack trace")
        return original(path, provider)

    monkeypatch.setattr(onnx_export, "ort_runner", runner)
    out = tmp_path / "out"
    result = _export(tiny_checkpoint, out)
    record = result.manifest["parity"]["fp16"]
    assert record["status"] == "not_measured" and record["gated"] is False
    # Every provider tried said why (CUDA first where onnxruntime-gpu lists it), CPU last.
    assert record["reason"].endswith(
        "CPUExecutionProvider cannot run it: no kernel for this fp16 graph"
    )
    assert "fp16" in result.manifest["models"] and (out / "model.fp16.onnx").is_file()
    report = verify(out, remeasure=False)
    assert report.ok and report.gated
    (line,) = [x for x in report.lines if x.startswith("recorded parity fp16:")]
    assert line.endswith("not gated: served only when ungated variants are allowed")

    export_dir = ExportDir.load(out)
    assert (
        export_dir.gated
        and export_dir.manifest.verdict("fp32") == "gated"
        and not export_dir.manifest.verdict("fp16") == "gated"
    )
    assert not export_dir.has_variant("fp16")
    with pytest.raises(ExportDirError, match=r"not gated; refusing to serve it \(set CAPPY_ALLOW"):
        export_dir.model_path("fp16")
    allowed = ExportDir.load(out, allow_ungated=True)
    assert allowed.has_variant("fp16")
    with caplog.at_level("WARNING", logger="service.engine.export_dir"):
        assert allowed.model_path("fp16") == allowed.path / "model.fp16.onnx"
    assert "serving the fp16 model although its parity with PyTorch is not_measured" in caplog.text


def test_parity_record_ships_what_a_gate_would_refuse(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.engine.export_dir import ExportDir, ExportDirError

    _damaging(monkeypatch, "export_fp32", _perturb_weights, 3)
    out = tmp_path / "out"
    result = _export(tiny_checkpoint, out, fp16=False, parity="record")
    manifest = result.manifest
    assert manifest["parity"]["mode"] == "record"
    record = manifest["parity"]["fp32"]
    assert record["status"] == "failed" and record["gated"] is False
    assert record["max_abs_diff"] > record["threshold_max_abs_diff"]
    # The plain graph fails too, so the optimised one (what a benchmark runs) is kept.
    assert manifest["models"]["fp32"]["optimized"] is True
    report = verify(out)
    assert report.ok, report.problems  # recorded figures, not problems: nothing was gated
    assert not report.gated
    assert any(
        line.startswith("parity: not gated (exported with --parity record)")
        for line in report.lines
    )

    with pytest.raises(ExportDirError, match=r"exported with --parity record; refusing"):
        ExportDir.load(out)
    allowed = ExportDir.load(out, allow_ungated=True)
    assert not allowed.gated and allowed.has_variant("fp32")


def test_an_unknown_parity_mode_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--parity lenient: not one of gate, record"):
        export(ExportOptions(model=str(tiny_checkpoint), out=tmp_path / "o", parity="lenient"))
    assert list(tmp_path.iterdir()) == []
