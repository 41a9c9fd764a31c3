"""Reading an export directory (the contract written by `model_export`): the manifest
`cappy_export.json`, the sha256 of every listed file, and the parity recorded at export time.

The service refuses a directory whose manifest is missing or malformed, whose files are missing or
changed, or whose fp32 parity did not pass; a precision variant whose parity failed is refused when
asked for. Every refusal is an `ExportDirError` whose message names the directory and the reason.

Gated and ungated. A variant is *gated* when its parity passed a gate at export time: the export
was made in parity mode "gate" (the default; manifests without `parity.mode` are gated exports)
and its record says "passed" (and not `"gated": false`). Anything else that the export ships is
*ungated*: a variant whose parity could not be measured, or every graph of an export made with
`cappy export --parity record`. Ungated graphs are refused unless the directory was loaded with
`allow_ungated=True` (CAPPY_ALLOW_UNGATED=1 / --allow-ungated), and then served with a warning.
A variant that failed its gate is never served.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cappy.export_format import MANIFEST, ManifestUnreadable, load_manifest_json

logger = logging.getLogger(__name__)

SUPPORTED_FORMAT_VERSIONS = (1,)
# "openvino-int8": an OpenVINO IR statically quantised with NNCF on calibration text
# (`cappy export --int8-calibration`), used on CPU to screen candidates before re-scoring.
Variant = Literal["fp32", "fp16", "int8", "openvino-int8"]
VARIANTS: tuple[Variant, ...] = ("fp32", "fp16", "int8", "openvino-int8")
_KNOWN_INPUTS = {"input_ids", "attention_mask", "token_type_ids"}
PARITY_MODES = ("gate", "record")
ALLOW_UNGATED_HINT = "set CAPPY_ALLOW_UNGATED=1 / --allow-ungated to serve it"
# How a variant may be served: passed its gate; servable only when ungated graphs are allowed;
# never (failed its gate).
Verdict = Literal["gated", "ungated", "refused"]
_HASH_CHUNK = 1 << 20


class ExportDirError(Exception):
    """The export directory cannot be served; `str(exc)` says which directory and why."""


class ModelEntry(BaseModel):
    """One ONNX graph of the export (`models.<variant>`)."""

    model_config = ConfigDict(extra="allow")

    file: str = Field(description="File name of the graph, relative to the export directory.")
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
    """The fields of cappy_export.json that the service relies on; other fields are kept."""

    model_config = ConfigDict(extra="allow")

    format: Literal["cappy-export"]
    format_version: int
    source: dict[str, object] = Field(description="Where the checkpoint came from.")
    architecture: dict[str, object] | None = None
    max_length: int = Field(ge=4, description="Truncation length of a pair, specials included.")
    inputs: list[str] = Field(min_length=1, description="Graph input names, in order.")
    output: str = "logits"
    pad_token_id: int | None = None
    models: dict[str, ModelEntry]
    parity: dict[str, object]
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
    def _known_parity_mode(cls, value: dict[str, object]) -> dict[str, object]:
        mode = value.get("mode", "gate")
        if mode not in PARITY_MODES:
            raise ValueError(f"parity mode {mode!r} is not one of {', '.join(PARITY_MODES)}")
        return value

    @field_validator("inputs")
    @classmethod
    def _known_inputs(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - _KNOWN_INPUTS)
        if unknown:
            raise ValueError(f"unsupported graph inputs {unknown}")
        if "input_ids" not in value:
            raise ValueError("the graph must take input_ids")
        return value

    def parity_of(self, variant: str) -> ParityRecord | None:
        raw = self.parity.get(variant)
        if raw is None:
            return None
        return ParityRecord.model_validate(raw)

    @property
    def parity_mode(self) -> str:
        """gate, or record for an export made with `cappy export --parity record`."""
        return str(self.parity.get("mode", "gate"))

    def verdict(self, variant: str) -> Verdict:
        """How `variant`'s parity lets it be served (module docstring)."""
        record = self.parity_of(variant)
        gate_mode = self.parity_mode == "gate"
        if record is not None and gate_mode and record.status == "failed":
            return "refused"
        if record is not None and gate_mode and record.status == "passed":
            return "gated" if record.gated is not False else "ungated"
        return "ungated"


@dataclass(frozen=True)
class ExportDir:
    """A verified export directory.

    Attributes:
        path: the directory (resolved).
        manifest: the validated manifest.
        allow_ungated: whether graphs that did not pass a parity gate may be served.
    """

    path: Path
    manifest: Manifest
    allow_ungated: bool = False
    _warned: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    @classmethod
    def load(
        cls, path: str | Path, *, verify_hashes: bool = True, allow_ungated: bool = False
    ) -> ExportDir:
        """Reads and verifies an export directory.

        Args:
            path: the export directory.
            verify_hashes: check every listed file's sha256 (streamed); only tests turn it off.
            allow_ungated: serve graphs that did not pass a parity gate (not measured, or an
                export made with --parity record), with a warning; failed gates stay refused.

        Raises:
            ExportDirError: no manifest, malformed manifest, missing or changed files, fp32
                parity missing or failed, or fp32 ungated and `allow_ungated` False.
        """
        directory = Path(path).expanduser().resolve()
        manifest_path = directory / MANIFEST
        try:
            raw = load_manifest_json(
                directory, hint="Create one with `cappy export --model MODEL --out DIR`."
            )
        except ManifestUnreadable as exc:
            raise ExportDirError(str(exc)) from exc
        try:
            manifest = Manifest.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ExportDirError(f"{manifest_path}: invalid manifest ({problems})") from exc

        if "fp32" not in manifest.models:
            raise ExportDirError(f"{manifest_path}: no fp32 model listed under 'models'")
        for variant, entry in manifest.models.items():
            if entry.file not in manifest.files:
                raise ExportDirError(
                    f"{manifest_path}: model {variant} file {entry.file!r} has no sha256 in 'files'"
                )
        if verify_hashes:
            mismatches = _check_files(directory, manifest.files)
            if mismatches:
                raise ExportDirError(
                    f"{directory}: files do not match the manifest: {'; '.join(mismatches)}"
                )
        fp32 = _parity_or_error(manifest, "fp32", manifest_path)
        for variant in manifest.models:
            _parity_or_error(manifest, variant, manifest_path)
        if fp32 is None or manifest.verdict("fp32") == "refused":
            status = "missing" if fp32 is None else fp32.describe()
            raise ExportDirError(
                f"{directory}: fp32 parity with PyTorch is {status}; refusing to serve it"
            )
        export = cls(path=directory, manifest=manifest, allow_ungated=allow_ungated)
        if manifest.verdict("fp32") == "ungated":
            export._check_ungated("fp32")
        logger.info(
            "export directory %s: %s, max_length %d, variants %s, parity %s",
            directory,
            (manifest.architecture or {}).get("model_type", "unknown architecture"),
            manifest.max_length,
            sorted(manifest.models),
            "gated" if export.gated else "recorded, not gated",
        )
        return export

    @property
    def max_length(self) -> int:
        return self.manifest.max_length

    @property
    def input_names(self) -> list[str]:
        return list(self.manifest.inputs)

    @property
    def output_name(self) -> str:
        return self.manifest.output

    @property
    def gated(self) -> bool:
        """Whether the export was made with its parity gates enforced (False: --parity record,
        every graph ungated)."""
        return self.manifest.parity_mode == "gate"

    def is_gated(self, precision: str) -> bool:
        """Whether `precision` passed its parity gate at export time."""
        return self.manifest.verdict(precision) == "gated"

    def has_variant(self, precision: str) -> bool:
        """Whether `precision` is shipped and may be served: it passed its gate, or it is ungated
        and ungated graphs are allowed. A variant that failed its gate never is."""
        if precision not in self.manifest.models:
            return False
        verdict = self.manifest.verdict(precision)
        return verdict == "gated" or (verdict == "ungated" and self.allow_ungated)

    def parity(self, precision: str) -> ParityRecord | None:
        """The recorded parity of a variant, or None when none was recorded."""
        return self.manifest.parity_of(precision)

    def model_path(self, precision: str) -> Path:
        """The model file of `precision` ("fp32", "fp16", "int8": ONNX; "openvino-int8": an
        OpenVINO IR .xml, its weights beside it).

        Raises:
            ExportDirError: unknown precision, variant not in this export, its parity failed, or
                it is ungated and ungated graphs are not allowed.
        """
        if precision not in VARIANTS:
            raise ExportDirError(
                f"unknown precision {precision!r}; an export holds {', '.join(VARIANTS)}"
            )
        entry = self.manifest.models.get(precision)
        if entry is None:
            record = self.manifest.parity_of(precision)
            why = (
                f" (its parity {record.status}: {record.reason})"
                if record is not None and record.status == "failed"
                else ""
            )
            raise ExportDirError(
                f"{self.path}: no {precision} model in this export{why}; "
                f"available: {', '.join(sorted(self.manifest.models))}"
            )
        verdict = self.manifest.verdict(precision)
        if verdict == "refused":
            record = self.manifest.parity_of(precision)
            reason = record.reason if record is not None else None
            raise ExportDirError(
                f"{self.path}: the {precision} model failed parity with PyTorch "
                f"({reason or 'no reason recorded'}); refusing to serve it"
            )
        if verdict == "ungated":
            self._check_ungated(precision)
        return self.path / entry.file

    def _check_ungated(self, precision: str) -> None:
        """Refuses an ungated graph unless allowed; allowed, warns once per variant."""
        record = self.manifest.parity_of(precision)
        status = "not recorded" if record is None else record.describe()
        how = "" if self.gated else ", exported with --parity record"
        if not self.allow_ungated:
            raise ExportDirError(
                f"{self.path}: the {precision} model's parity with PyTorch is {status}, not "
                f"gated{how}; refusing to serve it ({ALLOW_UNGATED_HINT})"
            )
        if precision not in self._warned:
            self._warned.add(precision)
            logger.warning(
                "%s: serving the %s model although its parity with PyTorch is %s, not gated%s "
                "(ungated graphs allowed)",
                self.path,
                precision,
                status,
                how,
            )


def _parity_or_error(manifest: Manifest, variant: str, where: Path) -> ParityRecord | None:
    try:
        return manifest.parity_of(variant)
    except ValidationError as exc:
        raise ExportDirError(f"{where}: invalid parity record for {variant} ({exc})") from exc


def _check_files(directory: Path, files: Mapping[str, str]) -> list[str]:
    problems = []
    for name, expected in files.items():
        path = (directory / name).resolve()
        if directory not in path.parents:
            problems.append(f"{name}: outside the export directory")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != expected.lower():
            problems.append(f"{name}: sha256 mismatch (changed since export)")
    return problems


def sha256_file(path: Path, chunk: int = _HASH_CHUNK) -> str:
    """sha256 hex digest of a file, read in chunks (exports hold GB-sized graphs)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
