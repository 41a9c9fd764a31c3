"""One contract, two readers: over a table of damaged export directories, `cappy verify`
(model_export) accepts exactly the directories the service (ExportDir) loads. Both read through
cappy.export_format."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cappy import export_format as fmt
from model_export.errors import ExportError
from model_export.verify import verify
from service.engine.export_dir import ExportDir, ExportDirError


def _edit(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        path = directory / fmt.MANIFEST
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))

    return damage


def _outside(directory: Path) -> None:
    secret = directory.parent / "outside.txt"
    secret.write_text("not part of the export")
    _edit(lambda m: m["files"].__setitem__("../outside.txt", fmt.sha256_file(secret)))(directory)


def _gate_failed(manifest: dict[str, Any]) -> None:
    manifest["parity"]["fp32"].update(status="failed", gated=False, reason="max |diff| 1")


def _recorded_only(manifest: dict[str, Any]) -> None:
    manifest["parity"]["mode"] = fmt.PARITY_RECORD
    for variant in manifest["models"]:
        if isinstance(manifest["parity"].get(variant), dict):
            manifest["parity"][variant]["gated"] = False


CASES: dict[str, tuple[Callable[[Path], None], bool]] = {
    "intact": (lambda _directory: None, True),
    "upper-case hashes": (
        _edit(lambda m: m.__setitem__("files", {k: v.upper() for k, v in m["files"].items()})),
        True,
    ),
    "recorded, not gated (served when allowed)": (_edit(_recorded_only), True),
    "no manifest": (lambda d: (d / fmt.MANIFEST).unlink(), False),
    "manifest not JSON": (lambda d: (d / fmt.MANIFEST).write_text("{not json"), False),
    "unsupported format version": (_edit(lambda m: m.__setitem__("format_version", 2)), False),
    "unknown parity mode": (_edit(lambda m: m["parity"].__setitem__("mode", "maybe")), False),
    "a listed file missing": (lambda d: (d / "tokenizer.json").unlink(), False),
    "a graph changed": (lambda d: (d / "model.onnx").open("ab").write(b"\0"), False),
    "a listed path outside the directory": (_outside, False),
    "no fp32 model": (_edit(lambda m: m["models"].pop("fp32")), False),
    "a model file without a hash": (
        _edit(lambda m: m["files"].pop(m["models"]["int8"]["file"])),
        False,
    ),
    "model weights without a hash": (
        _edit(lambda m: m["models"]["int8"].__setitem__("weights", "model.int8.bin")),
        False,
    ),
    "an unknown graph input": (_edit(lambda m: m["inputs"].append("pixel_values")), False),
    "fp32 failed its gate": (_edit(_gate_failed), False),
    "a malformed parity record": (
        _edit(lambda m: m["parity"]["int8"].__setitem__("status", "fine")),
        False,
    ),
}


def _verify_accepts(directory: Path) -> bool:
    try:
        return verify(directory, remeasure=False).ok
    except ExportError:
        return False


def _service_loads(directory: Path) -> bool:
    try:
        ExportDir.load(directory, allow_ungated=True)
    except ExportDirError:
        return False
    return True


@pytest.mark.parametrize("case", list(CASES))
def test_verify_and_the_service_agree(case: str, tiny_export: Path, tmp_path: Path) -> None:
    directory = tmp_path / "export"
    shutil.copytree(tiny_export, directory)
    damage, valid = CASES[case]
    damage(directory)
    assert (_verify_accepts(directory), _service_loads(directory)) == (valid, valid)


def test_one_reason_per_refusal(tiny_export: Path, tmp_path: Path) -> None:
    """Both sides say why in the same words: the contract's own message."""
    directory = tmp_path / "export"
    shutil.copytree(tiny_export, directory)
    _edit(lambda m: m.__setitem__("format_version", 2))(directory)
    with pytest.raises(ExportDirError) as served:
        ExportDir.load(directory)
    with pytest.raises(ExportError) as verified:
        verify(directory, remeasure=False)
    assert "format_version 2 is not supported" in str(served.value)
    assert str(served.value) == str(verified.value)
