"""ExportDir: accepts a complete export, refuses every broken one with a message that says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.engine.export_dir import ExportDir, ExportDirError, sha256_file
from tests.unit.engine.conftest import TinyExport, write_manifest


def test_loads_a_valid_export(tiny_engine_export: TinyExport) -> None:
    export = ExportDir.load(tiny_engine_export.path)
    assert export.max_length == 512
    assert export.input_names == ["input_ids", "attention_mask"]
    assert export.output_name == "logits"
    assert export.model_path("fp32") == export.path / "model.onnx"
    assert export.parity("fp32") is not None
    assert export.has_variant("fp32") and not export.has_variant("fp16")


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


@pytest.mark.parametrize("status", ["failed", "not_measured"])
def test_refuses_fp32_parity_not_passed(export_copy: Path, status: str) -> None:
    write_manifest(
        export_copy,
        parity={"fp32": {"status": status, "max_abs_diff": 0.3, "reason": "max |diff| 0.3 > 1e-4"}},
    )
    with pytest.raises(ExportDirError, match=f"fp32 parity with PyTorch is {status}"):
        ExportDir.load(export_copy)


def test_refuses_missing_fp32_parity(export_copy: Path) -> None:
    write_manifest(export_copy, parity={"reference": "PyTorch fp32"})
    with pytest.raises(ExportDirError, match="fp32 parity with PyTorch is missing"):
        ExportDir.load(export_copy)


def test_variant_with_failed_parity_is_refused(export_copy: Path) -> None:
    # The exporter deletes a failed variant; a directory that still lists one must not serve it.
    (export_copy / "model.int8.onnx").write_bytes((export_copy / "model.onnx").read_bytes())
    write_manifest(
        export_copy,
        models={
            "fp32": {"file": "model.onnx", "dtype": "float32"},
            "int8": {"file": "model.int8.onnx", "dtype": "int8-dynamic"},
        },
        parity={
            "fp32": {"status": "passed", "max_abs_diff": 1e-6},
            "int8": {"status": "failed", "reason": "argmax agreement 0.9 < 0.99"},
            "fp16": {"status": "failed", "reason": "argmax agreement 0.8 < 0.999"},
        },
    )
    export = ExportDir.load(export_copy)
    assert export.model_path("fp32").name == "model.onnx"
    assert not export.has_variant("int8")
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
    assert export.model_path("fp32").is_file()
    for variant in ("fp16", "int8"):
        if export.has_variant(variant):
            assert export.model_path(variant).is_file()
