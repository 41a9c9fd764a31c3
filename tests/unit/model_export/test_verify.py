"""`verify` on a copy of a real export: changed and missing files, recorded parity failures, no
manifest, an unreachable source, and manifests from before the parity mode existed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cappy import export_format as fmt
from model_export import manifest as mf
from model_export.errors import ExportError
from model_export.verify import verify


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
    manifest = json.loads((tiny_copy / fmt.MANIFEST).read_text())
    manifest["parity"]["fp32"]["status"] = "failed"
    mf.write(tiny_copy, manifest)
    report = verify(tiny_copy, remeasure=False)
    assert "parity fp32: recorded status 'failed'" in report.problems


def test_verify_refuses_a_directory_without_manifest(tiny_copy: Path) -> None:
    (tiny_copy / fmt.MANIFEST).unlink()
    with pytest.raises(ExportError, match="no cappy_export.json"):
        verify(tiny_copy)


def test_verify_skips_remeasure_when_source_is_gone(tiny_copy: Path) -> None:
    manifest = json.loads((tiny_copy / fmt.MANIFEST).read_text())
    manifest["source"]["model"] = "/nonexistent/checkpoint"
    mf.write(tiny_copy, manifest)
    report = verify(tiny_copy)
    assert report.ok
    assert any("re-measure: skipped, source not reachable" in line for line in report.lines)


def test_an_old_manifest_without_mode_reads_as_gated(tiny_copy: Path) -> None:
    manifest = json.loads((tiny_copy / fmt.MANIFEST).read_text())
    del manifest["parity"]["mode"]
    for variant in manifest["models"]:
        manifest["parity"][variant].pop("gated")
    mf.write(tiny_copy, manifest)
    report = verify(tiny_copy, remeasure=False)
    assert report.ok and report.gated
    assert mf.read(tiny_copy).verdict("fp32") == "gated"


def test_verify_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="absent: no such export directory"):
        verify(tmp_path / "absent")
