"""Reading an export directory for serving: the contract (cappy.export_format: the manifest's
schema, the sha256 of every listed file, the gating verdict of each variant) applied, and what
the service adds: which variants it may serve.

The service refuses a directory whose manifest is missing or malformed, whose files are missing or
changed, or whose fp32 parity did not pass; a precision variant whose parity failed is refused when
asked for. Every refusal is an `ExportDirError` whose message names the directory and the reason.
Ungated graphs (cappy.export_format) are refused unless the directory was loaded with
`allow_ungated=True` (CAPPY_ALLOW_UNGATED=1 / --allow-ungated), and then served with a warning.
A variant that failed its gate is never served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from cappy.export_format import (
    VARIANTS,
    Manifest,
    ManifestInvalid,
    ManifestUnreadable,
    ParityRecord,
    check_files,
    read_manifest,
)

logger = logging.getLogger(__name__)

ALLOW_UNGATED_HINT = "set CAPPY_ALLOW_UNGATED=1 / --allow-ungated to serve it"


class ExportDirError(Exception):
    """The export directory cannot be served; `str(exc)` says which directory and why."""


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
        try:
            manifest = read_manifest(
                directory, hint="Create one with `cappy export --model MODEL --out DIR`."
            )
        except (ManifestUnreadable, ManifestInvalid) as exc:
            raise ExportDirError(str(exc)) from exc
        if verify_hashes:
            mismatches = check_files(directory, manifest.files)
            if mismatches:
                raise ExportDirError(
                    f"{directory}: files do not match the manifest: {'; '.join(mismatches)}"
                )
        fp32 = manifest.parity_of("fp32")
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
