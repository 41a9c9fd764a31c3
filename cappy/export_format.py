"""The export directory's contract, stated once: model_export writes the directory, the service
reads it, and neither imports the other, so the schema, its checks and the gating verdict live
here, and both sides (and the tests) use them. A directory `cappy verify` accepts is one the
service loads, and the reverse.

The manifest `cappy_export.json` (README, "The export directory"): `format`/`format_version`,
`source`, `architecture`, `max_length`, `inputs`, `output`, `pad_token_id`, `score`, `models`
(per variant: `file`, optional `weights`, `dtype`, ...), `parity` (per variant, and `mode`),
`files` (sha256 of every file by relative path). Unknown fields are kept.

Gated and ungated. A variant is *gated* when its parity passed a gate at export time: the export
was made in parity mode "gate" (the default; manifests without `parity.mode` are gated exports)
and its record says "passed" (and not `"gated": false`). A variant that failed its gate is
refused. Anything else shipped is *ungated*: a variant whose parity could not be measured, or
every graph of an export made with `cappy export --parity record`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MANIFEST = "cappy_export.json"
FORMAT = "cappy-export"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (FORMAT_VERSION,)
# "openvino-int8": an OpenVINO IR statically quantised with NNCF on calibration text
# (`cappy export --int8-calibration`), used on CPU to screen candidates before re-scoring.
Variant = Literal["fp32", "fp16", "int8", "openvino-int8"]
VARIANTS: tuple[Variant, ...] = ("fp32", "fp16", "int8", "openvino-int8")
VARIANT_FILES: dict[str, str] = {
    "fp32": "model.onnx",
    "fp16": "model.fp16.onnx",
    "int8": "model.int8.onnx",
    "openvino-int8": "model.int8.xml",  # its weights: "weights" in the model entry (model.int8.bin)
}
PARITY_GATE = "gate"
PARITY_RECORD = "record"
PARITY_MODES = (PARITY_GATE, PARITY_RECORD)
KNOWN_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids"})
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
# How a variant may be served: passed its gate; servable only when ungated graphs are allowed;
# never (failed its gate).
Verdict = Literal["gated", "ungated", "refused"]
_HASH_CHUNK = 1 << 20


class ManifestUnreadable(ValueError):
    """No manifest to read, or one that is not JSON; the message is the one-line reason."""


class ManifestInvalid(ValueError):
    """A manifest that breaks the contract; the message is the one-line reason."""


class ModelEntry(BaseModel):
    """One graph of the export (`models.<variant>`)."""

    model_config = ConfigDict(extra="allow")

    file: str = Field(description="File name of the graph, relative to the export directory.")
    weights: str | None = Field(default=None, description="A separate weights file (OpenVINO).")
    dtype: str | None = Field(default=None, description="Weight/compute type of the graph.")


class ParityRecord(BaseModel):
    """Parity of one variant with PyTorch fp32, measured at export time (`parity.<variant>`)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["passed", "failed", "not_measured"]
    max_abs_diff: float | None = None
    argmax_agreement: float | None = None
    reason: str | None = None
    gated: bool | None = Field(
        default=None,
        description="Whether a gate passed it for serving; None: a record written before the "
        "field (gated when passed).",
    )

    def describe(self) -> str:
        """The status and its reason, e.g. `failed (max |diff| ...)`, for messages."""
        return self.status + (f" ({self.reason})" if self.reason else "")


class Manifest(BaseModel):
    """cappy_export.json as both sides read it; fields beyond these are kept."""

    model_config = ConfigDict(extra="allow")

    format: Literal["cappy-export"]
    format_version: int
    source: dict[str, Any] = Field(description="Where the checkpoint came from.")
    architecture: dict[str, Any] | None = None
    max_length: int = Field(ge=4, description="Truncation length of a pair, specials included.")
    inputs: list[str] = Field(min_length=1, description="Graph input names, in order.")
    output: str = "logits"
    pad_token_id: int | None = None
    models: dict[str, ModelEntry]
    parity: dict[str, Any]
    files: dict[str, str] = Field(description="sha256 (hex) of every file, by relative path.")

    @field_validator("format_version")
    @classmethod
    def _supported_version(cls, value: int) -> int:
        if value not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(
                f"format_version {value} is not supported (supported: {SUPPORTED_FORMAT_VERSIONS})"
            )
        return value

    @field_validator("parity")
    @classmethod
    def _known_parity_mode(cls, value: dict[str, Any]) -> dict[str, Any]:
        mode = value.get("mode", PARITY_GATE)
        if mode not in PARITY_MODES:
            raise ValueError(f"parity mode {mode!r} is not one of {', '.join(PARITY_MODES)}")
        return value

    @field_validator("inputs")
    @classmethod
    def _known_inputs(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - KNOWN_INPUTS)
        if unknown:
            raise ValueError(f"unsupported graph inputs {unknown}")
        if "input_ids" not in value:
            raise ValueError("the graph must take input_ids")
        return value

    @model_validator(mode="after")
    def _models_are_listed(self) -> Manifest:
        if "fp32" not in self.models:
            raise ValueError("no fp32 model listed under 'models'")
        for variant, entry in self.models.items():
            for kind, name in (("file", entry.file), ("weights", entry.weights)):
                if name is not None and name not in self.files:
                    raise ValueError(f"model {variant} {kind} {name!r} has no sha256 in 'files'")
            record = self.parity.get(variant)
            if record is not None:
                ParityRecord.model_validate(record)
        return self

    def parity_of(self, variant: str) -> ParityRecord | None:
        raw = self.parity.get(variant)
        return None if raw is None else ParityRecord.model_validate(raw)

    @property
    def parity_mode(self) -> str:
        """gate, or record for an export made with `cappy export --parity record`."""
        return str(self.parity.get("mode", PARITY_GATE))

    def verdict(self, variant: str) -> Verdict:
        """How `variant`'s parity lets it be served (module docstring)."""
        record = self.parity_of(variant)
        gate_mode = self.parity_mode == PARITY_GATE
        if record is not None and gate_mode and record.status == "failed":
            return "refused"
        if record is not None and gate_mode and record.status == "passed":
            return "gated" if record.gated is not False else "ungated"
        return "ungated"


def _missing_manifest(directory: Path, *, hint: str | None = None) -> str | None:
    """Why `directory` has no manifest to read (None when it has one): not a directory, or no
    manifest in it (then `hint`, a sentence, follows)."""
    if not directory.is_dir():
        return f"{directory}: no such export directory"
    if not (directory / MANIFEST).is_file():
        reason = f"{directory}: no {MANIFEST}; not an export directory (or an unfinished one)"
        return f"{reason}. {hint}" if hint else reason
    return None


def load_manifest_json(directory: Path, *, hint: str | None = None) -> Any:
    """The manifest's parsed JSON, before its structure is checked.

    Raises:
        ManifestUnreadable: no directory or manifest, or a manifest that cannot be read or
            parsed.
    """
    missing = _missing_manifest(directory, hint=hint)
    if missing is not None:
        raise ManifestUnreadable(missing)
    path = directory / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestUnreadable(f"{path}: unreadable manifest ({exc})") from exc


def read_manifest(directory: Path, *, hint: str | None = None) -> Manifest:
    """The checked manifest of an export directory (its files are checked by `check_files`).

    Raises:
        ManifestUnreadable: see `load_manifest_json`.
        ManifestInvalid: the manifest breaks the contract.
    """
    raw = load_manifest_json(directory, hint=hint)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ManifestInvalid(f"{directory / MANIFEST}: invalid manifest ({problems})") from exc


def sha256_file(path: Path, chunk: int = _HASH_CHUNK) -> str:
    """sha256 hex digest of a file, read in chunks (exports hold GB-sized graphs)."""
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


def check_files(directory: Path, files: Mapping[str, str]) -> list[str]:
    """Problems with the listed files: outside the directory, missing, or changed (hashes are
    compared case-insensitively)."""
    root = directory.resolve()
    problems = []
    for name, expected in files.items():
        path = (root / name).resolve()
        if root not in path.parents:
            problems.append(f"{name}: outside the export directory")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != str(expected).lower():
            problems.append(f"{name}: sha256 mismatch (changed since export)")
    return problems
