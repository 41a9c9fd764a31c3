"""The writer's side of the export directory's manifest, `cappy_export.json`: writing it, and
reading it back as `cappy verify` and the export itself do. Its contract (the schema, the file
checks, the gating verdict) is cappy.export_format, the module the service reads with too.

Parity: `parity.mode` says whether the export was gated ("gate": a variant is shipped only when
its gate passed, and fp32 must pass) or only recorded ("record", `cappy export --parity record`:
figures kept, nothing enforced). Each variant's record says `gated`: whether a gate passed it for
serving.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cappy import export_format as fmt
from model_export.errors import ExportError


def write(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / fmt.MANIFEST
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read(directory: Path) -> fmt.Manifest:
    """The checked manifest (cappy.export_format); ExportError with a one-line reason."""
    try:
        return fmt.read_manifest(directory)
    except (fmt.ManifestUnreadable, fmt.ManifestInvalid) as exc:
        raise ExportError(str(exc)) from exc
