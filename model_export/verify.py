"""`verify`: the re-check of an export directory (manifest, hashes, recorded parity, and parity
re-measured against the source checkpoint when it is reachable without a download)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cappy import export_format as fmt
from model_export import manifest as mf
from model_export import openvino_int8, source
from model_export.errors import ExportError
from model_export.prober import Prober


@dataclass
class VerifyReport:
    directory: Path
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    # False for an export made with --parity record: its figures were never enforced.
    gated: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems


NOT_GATED = (
    "not gated (exported with --parity record): the service serves it only when allowed to "
    "serve ungated exports (CAPPY_ALLOW_UNGATED=1 / --allow-ungated)"
)


def verify(directory: Path, *, remeasure: bool = True, progress: bool = False) -> VerifyReport:
    """Checks the manifest, the hashes and the recorded parity, then re-measures parity when the
    source checkpoint is reachable without a download (a local path, or the local hub cache).

    A gated export must hold a passed fp32 record and no failed variant; an export made with
    --parity record is reported as not gated, its recorded failures are not problems, but a
    variant that re-measures worse than recorded (failed where it was not) is."""
    report = VerifyReport(directory)
    manifest = mf.read(directory)
    report.gated = manifest.parity_mode == fmt.PARITY_GATE
    report.lines.append(f"manifest: {fmt.MANIFEST} format {manifest.format_version}")
    problems = fmt.check_files(directory, manifest.files)
    report.problems += problems
    report.lines.append(
        f"hashes: {len(manifest.files)} files" + (" ok" if not problems else " FAILED")
    )
    if not report.gated:
        report.lines.append(f"parity: {NOT_GATED}")
    recorded: dict[str, str | None] = {}
    for variant in manifest.models:
        record = manifest.parity.get(variant, {})
        status = recorded[variant] = record.get("status")
        if report.gated and (status == "failed" or (variant == "fp32" and status != "passed")):
            report.problems.append(f"parity {variant}: recorded status {status!r}")
        line = f"recorded parity {variant}: {_describe(record)}"
        if report.gated and manifest.verdict(variant) != "gated":
            line += "; not gated: served only when ungated variants are allowed"
        report.lines.append(line)
    if not remeasure or report.problems:
        return report
    src = manifest.source
    try:
        ref = source.resolve(src["model"], src.get("commit") or src.get("revision"))
        loaded = source.load(ref, local_only=True)
    except ExportError as exc:
        report.lines.append(f"re-measure: skipped, source not reachable ({exc})")
        return report
    prober = Prober(loaded.model, loaded.tokenizer, manifest.max_length)
    for variant, entry in tqdm(
        list(manifest.models.items()), desc="re-measure parity", disable=not progress
    ):
        result = prober.measure(directory / entry.file, variant)
        line = f"re-measured parity {variant}: {_describe(result.as_dict())}"
        if variant == openvino_int8.VARIANT and result.status != "not_measured":
            line += "; probe sets only (the held-out calibration sets are not kept in the export)"
        report.lines.append(line)
        if result.status == "failed" and recorded[variant] != "failed":
            report.problems.append(f"parity {variant} re-measured: {result.reason}")
    return report


def _describe(record: dict[str, Any]) -> str:
    """One line of a parity record: the verdict, the diff against its threshold, argmax
    agreement on decided sets and on near-ties (records from before those fields: overall)."""
    if record.get("status") == "not_measured":
        return f"not measured ({record.get('reason')})"
    diff = [f"relative {_figure(record.get('max_rel_diff'))}"] if "max_rel_diff" in record else []
    if isinstance(record.get("threshold_max_abs_diff"), int | float):
        diff.append(f"threshold {_figure(record['threshold_max_abs_diff'])}")
    parts = [f"max |diff| {_figure(record.get('max_abs_diff'))}" + _parenthesised(diff)]
    agree = record.get("argmax_agreement")
    agreement = "argmax agreement " + (f"{agree:.4f}" if isinstance(agree, int | float) else "n/a")
    if "decided_sets" in record:
        threshold = record.get("threshold_argmax_agreement")
        agreement += f" on {record['decided_sets']} decided sets" + _parenthesised(
            [f"threshold {threshold:g}"] if isinstance(threshold, int | float) else []
        )
        ties = record.get("near_tie_agreement")
        agreement += f", {record.get('near_tie_sets')} near-ties" + _parenthesised(
            [f"agreement {ties:.4f}, not counted"] if isinstance(ties, int | float) else []
        )
    parts.append(agreement)
    where = f"on {record.get('candidate_sets')} sets / {record.get('pairs')} pairs"
    return f"{record.get('status')} {where} ({record.get('provider')}): {'; '.join(parts)}"


def _parenthesised(items: list[str]) -> str:
    return f" ({'; '.join(items)})" if items else ""


def _figure(value: object) -> str:
    return f"{value:.2e}" if isinstance(value, int | float) else "n/a"
