"""ExportDir: accepts a complete export, refuses every broken one with a message that says why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cappy.export_format import sha256_file
from service.engine.export_dir import ExportDir, ExportDirError
from tests.unit.engine.conftest import TinyExport, write_manifest


def test_loads_a_valid_export(tiny_engine_export: TinyExport) -> None:
    export = ExportDir.load(tiny_engine_export.path)
    assert export.max_length == 512
    assert export.input_names == ["input_ids", "attention_mask"]
    assert export.output_name == "logits"
    assert export.model_path("fp32") == export.path / "model.onnx"
    assert export.parity("fp32") is not None
    assert export.has_variant("fp32") and not export.has_variant("fp16")
    # A manifest without parity.mode or records' "gated" (written before them) is a gated export.
    assert export.gated and export.manifest.verdict("fp32") == "gated" and not export.allow_ungated


def test_extra_manifest_fields_are_kept(export_copy: Path) -> None:
    write_manifest(export_copy, exporter="torch.onnx", versions={"onnx": "1.17"})
    export = ExportDir.load(export_copy)
    assert export.manifest.model_extra is not None
    assert export.manifest.model_extra["exporter"] == "torch.onnx"


def test_refuses_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ExportDirError, match="no such export directory"):
        ExportDir.load(tmp_path / "nope")


def test_refuses_missing_manifest(export_copy: Path) -> None:
    (export_copy / "cappy_export.json").unlink()
    with pytest.raises(ExportDirError, match="no cappy_export.json"):
        ExportDir.load(export_copy)


def test_refuses_unreadable_manifest(export_copy: Path) -> None:
    (export_copy / "cappy_export.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ExportDirError, match="unreadable manifest"):
        ExportDir.load(export_copy)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"format": "something-else"}, "format"),
        ({"format_version": 99}, "format_version 99 is not supported"),
        ({"max_length": "long"}, "max_length"),
        ({"inputs": ["input_ids", "pixel_values"]}, "unsupported graph inputs"),
        ({"models": {"fp16": {"file": "model.onnx"}}}, "no fp32 model"),
        ({"models": {"fp32": {"file": "other.onnx"}}}, "has no sha256"),
    ],
)
def test_refuses_invalid_manifest(export_copy: Path, overrides: dict, message: str) -> None:
    write_manifest(export_copy, **overrides)
    with pytest.raises(ExportDirError, match=message):
        ExportDir.load(export_copy)


def test_refuses_missing_field(export_copy: Path) -> None:
    path = export_copy / "cappy_export.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    del manifest["files"]
    path.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ExportDirError, match="files"):
        ExportDir.load(export_copy)


def test_refuses_hash_mismatch(export_copy: Path) -> None:
    with (export_copy / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ExportDirError, match=r"model.onnx: sha256 mismatch"):
        ExportDir.load(export_copy)


def test_refuses_missing_listed_file(export_copy: Path) -> None:
    (export_copy / "tokenizer.json").unlink()
    with pytest.raises(ExportDirError, match="tokenizer.json: missing"):
        ExportDir.load(export_copy)


def test_refuses_file_outside_directory(export_copy: Path) -> None:
    manifest = write_manifest(export_copy)
    files = dict(manifest["files"], **{"../escape.txt": "0" * 64})
    write_manifest(export_copy, files=files)
    with pytest.raises(ExportDirError, match="outside the export directory"):
        ExportDir.load(export_copy)


@pytest.mark.parametrize("allow_ungated", [False, True])
def test_refuses_fp32_parity_failed(export_copy: Path, allow_ungated: bool) -> None:
    write_manifest(
        export_copy,
        parity={
            "fp32": {"status": "failed", "max_abs_diff": 0.3, "reason": "max |diff| 0.3 > 1e-4"}
        },
    )
    with pytest.raises(
        ExportDirError,
        match=r"fp32 parity with PyTorch is failed \(max \|diff\| 0.3 > 1e-4\); refusing to serve",
    ):
        ExportDir.load(export_copy, allow_ungated=allow_ungated)


def test_fp32_not_measured_is_served_only_when_allowed(
    export_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_manifest(export_copy, parity={"fp32": {"status": "not_measured", "reason": "no ORT"}})
    with pytest.raises(ExportDirError) as info:
        ExportDir.load(export_copy)
    assert str(info.value) == (
        f"{export_copy.resolve()}: the fp32 model's parity with PyTorch is not_measured (no ORT), "
        "not gated; refusing to serve it (set CAPPY_ALLOW_UNGATED=1 / --allow-ungated to serve it)"
    )
    with caplog.at_level("WARNING", logger="service.engine.export_dir"):
        export = ExportDir.load(export_copy, allow_ungated=True)
    assert export.has_variant("fp32") and not export.manifest.verdict("fp32") == "gated"
    assert export.model_path("fp32").name == "model.onnx"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1  # once per variant, not on every model_path
    assert "serving the fp32 model although its parity with PyTorch is not_measured" in warnings[0]


def _with_variant(
    export_copy: Path, variant: str, file: str, dtype: str, parity: dict[str, Any]
) -> None:
    """Lists a copy of the fp32 graph as `variant` beside fp32, under the manifest's `parity`."""
    (export_copy / file).write_bytes((export_copy / "model.onnx").read_bytes())
    write_manifest(
        export_copy,
        models={
            "fp32": {"file": "model.onnx", "dtype": "float32"},
            variant: {"file": file, "dtype": dtype},
        },
        parity=parity,
    )


def _record_mode(export_copy: Path, fp32_status: str) -> None:
    parity = {
        "mode": "record",
        "fp32": {"status": fp32_status, "max_abs_diff": 2e-4, "gated": False},
        "fp16": {"status": "failed", "reason": "argmax agreement 0.9 < 0.999", "gated": False},
    }
    _with_variant(export_copy, "fp16", "model.fp16.onnx", "float16", parity)


@pytest.mark.parametrize("fp32_status", ["passed", "failed"])
def test_a_record_mode_export_is_served_only_when_allowed(
    export_copy: Path, fp32_status: str
) -> None:
    # Even figures that would pass: nothing was enforced, so nothing is trusted by default.
    _record_mode(export_copy, fp32_status)
    with pytest.raises(
        ExportDirError,
        match=rf"fp32 model's parity with PyTorch is {fp32_status}, not gated, exported with "
        r"--parity record; refusing to serve it \(set CAPPY_ALLOW_UNGATED=1 / --allow-ungated",
    ):
        ExportDir.load(export_copy)
    export = ExportDir.load(export_copy, allow_ungated=True)
    assert not export.gated and not export.manifest.verdict("fp32") == "gated"
    # Recorded, not gated: even a variant whose figures fail is served when allowed.
    assert export.has_variant("fp16")
    assert export.model_path("fp16").name == "model.fp16.onnx"


def test_an_ungated_variant_is_not_usable_unless_allowed(export_copy: Path) -> None:
    """fp16 not measured at export (legacy record without "gated", and a new one): "auto"
    precision must not pick it on a GPU, and asking for it says how to opt in."""
    (export_copy / "model.fp16.onnx").write_bytes((export_copy / "model.onnx").read_bytes())
    models = {
        "fp32": {"file": "model.onnx", "dtype": "float32"},
        "fp16": {"file": "model.fp16.onnx", "dtype": "float16"},
    }
    for fp16 in (
        {"status": "not_measured", "reason": "CUDAExecutionProvider cannot run it"},
        {"status": "not_measured", "reason": "CUDAExecutionProvider cannot run it", "gated": False},
        {"status": "passed", "argmax_agreement": 1.0, "gated": False},
    ):
        parity = {"fp32": {"status": "passed", "max_abs_diff": 1e-6}, "fp16": fp16}
        write_manifest(export_copy, models=models, parity=parity)
        export = ExportDir.load(export_copy)
        assert export.gated and not export.manifest.verdict("fp16") == "gated"
        assert not export.has_variant("fp16")
        with pytest.raises(
            ExportDirError,
            match=r"the fp16 model's parity with PyTorch is .*, not gated; refusing to serve it "
            r"\(set CAPPY_ALLOW_UNGATED=1 / --allow-ungated to serve it\)",
        ):
            export.model_path("fp16")
        allowed = ExportDir.load(export_copy, allow_ungated=True)
        assert allowed.has_variant("fp16")
        assert allowed.model_path("fp16") == allowed.path / "model.fp16.onnx"


def test_refuses_an_unknown_parity_mode(export_copy: Path) -> None:
    write_manifest(
        export_copy, parity={"mode": "lenient", "fp32": {"status": "passed", "max_abs_diff": 0}}
    )
    with pytest.raises(ExportDirError, match="parity mode 'lenient' is not one of gate, record"):
        ExportDir.load(export_copy)


def test_refuses_missing_fp32_parity(export_copy: Path) -> None:
    write_manifest(export_copy, parity={"reference": "PyTorch fp32"})
    with pytest.raises(ExportDirError, match="fp32 parity with PyTorch is missing"):
        ExportDir.load(export_copy)


def test_variant_with_failed_parity_is_refused(export_copy: Path) -> None:
    # The exporter deletes a failed variant; a directory that still lists one must not serve it.
    parity = {
        "fp32": {"status": "passed", "max_abs_diff": 1e-6},
        "int8": {"status": "failed", "reason": "argmax agreement 0.9 < 0.99"},
        "fp16": {"status": "failed", "reason": "argmax agreement 0.8 < 0.999"},
    }
    _with_variant(export_copy, "int8", "model.int8.onnx", "int8-dynamic", parity)
    export = ExportDir.load(export_copy)
    assert export.model_path("fp32").name == "model.onnx"
    assert not export.has_variant("int8")
    # A failed gate is never served, ungated graphs allowed or not.
    assert not ExportDir.load(export_copy, allow_ungated=True).has_variant("int8")
    with pytest.raises(ExportDirError, match="int8 model failed parity"):
        ExportDir.load(export_copy, allow_ungated=True).model_path("int8")
    with pytest.raises(ExportDirError, match="int8 model failed parity"):
        export.model_path("int8")
    with pytest.raises(ExportDirError, match=r"no fp16 model in this export \(its parity failed"):
        export.model_path("fp16")
    with pytest.raises(ExportDirError, match="unknown precision"):
        export.model_path("bf16")


def test_sha256_streams_large_files(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "blob"
    data = bytes(range(256)) * 10_000  # bigger than one chunk below
    path.write_bytes(data)
    assert sha256_file(path, chunk=4096) == hashlib.sha256(data).hexdigest()


def test_reads_the_exporters_own_output(tiny_export: Path) -> None:
    """The contract end to end: model_export's real output loads (shared fixture)."""
    export = ExportDir.load(tiny_export)
    assert export.gated
    assert export.model_path("fp32").is_file()
    for variant in ("fp32", "fp16", "int8"):
        assert export.manifest.verdict(variant) == "gated" and export.has_variant(variant)
        assert export.model_path(variant).is_file()
