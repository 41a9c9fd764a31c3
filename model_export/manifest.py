"""The export directory's manifest, `cappy_export.json`: what it holds and how it is checked.

The schema is the contract between model_export (writer) and the service (reader); its fields are
documented in the README ("The export directory").

Parity: `parity.mode` says whether the export was gated ("gate": a variant is shipped only when
its gate passed, and fp32 must pass) or only recorded ("record", `cappy export --parity record`:
figures kept, nothing enforced). Each variant's record says `gated`: whether a gate passed it for
serving. Manifests written before these fields existed were gated exports: a missing mode is
"gate", and a record without `gated` is gated when its status is "passed".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cappy.export_format import FORMAT, MANIFEST, ManifestUnreadable, load_manifest_json
from model_export.errors import ExportError

FORMAT_VERSION = 1
VARIANT_FILES = {
    "fp32": "model.onnx",
    "fp16": "model.fp16.onnx",
    "int8": "model.int8.onnx",
    "openvino-int8": "model.int8.xml",  # its weights: "weights" in the model entry (model.int8.bin)
}
PARITY_GATE = "gate"
PARITY_RECORD = "record"
PARITY_MODES = (PARITY_GATE, PARITY_RECORD)
SCORE_SEMANTICS = {
    "output": "logits",
    "index": 0,
    "activation": "none",
    "description": (
        "Cappy's raw regression output logits[:, 0], trained with an L2 loss on targets in [0, 1]; "
        "not passed through a sigmoid, can fall slightly outside [0, 1]. Higher is better; ties "
        "go to the lower index."
    ),
}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_directory(directory: Path) -> dict[str, str]:
    """sha256 of every file below `directory` except the manifest, by relative POSIX path."""
    return {
        path.relative_to(directory).as_posix(): sha256_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def write(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read(directory: Path) -> dict[str, Any]:
    """Reads and structurally checks a manifest; ExportError with a one-line reason otherwise."""
    path = directory / MANIFEST
    try:
        manifest = load_manifest_json(directory)
    except ManifestUnreadable as exc:
        raise ExportError(str(exc)) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    for key in ("source", "max_length", "inputs", "models", "files", "parity"):
        if key not in manifest:
            raise ExportError(f"{path}: missing field {key!r}")
    if "fp32" not in manifest["models"]:
        raise ExportError(f"{path}: no fp32 model listed")
    if parity_mode(manifest) not in PARITY_MODES:
        raise ExportError(
            f"{path}: parity mode {parity_mode(manifest)!r} is not one of {', '.join(PARITY_MODES)}"
        )
    return manifest


def parity_mode(manifest: dict[str, Any]) -> str:
    """The parity mode, gate or record; manifests from before the field were gated exports."""
    return str(manifest["parity"].get("mode", PARITY_GATE))


def is_gated(manifest: dict[str, Any], variant: str) -> bool:
    """Whether a gate passed `variant` for serving (see the module docstring)."""
    record = manifest["parity"].get(variant)
    if parity_mode(manifest) != PARITY_GATE or not isinstance(record, dict):
        return False
    return record.get("status") == "passed" and record.get("gated", True) is not False


def check_files(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems with the listed files (missing, changed) and with unlisted model files."""
    problems = []
    files: dict[str, str] = manifest["files"]
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{name}: sha256 mismatch (file changed since export)")
    for variant, entry in manifest["models"].items():
        if entry.get("file") not in files:
            problems.append(f"model {variant}: file {entry.get('file')!r} not in the hash list")
        if "weights" in entry and entry["weights"] not in files:
            problems.append(f"model {variant}: weights {entry['weights']!r} not in the hash list")
    return problems
