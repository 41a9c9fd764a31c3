"""The names both sides of the export-directory contract use: model_export writes the directory,
the service reads it, and neither imports the other, so the shared facts live here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST = "cappy_export.json"
FORMAT = "cappy-export"


class ManifestUnreadable(ValueError):
    """No manifest to read, or one that is not JSON; the message is the one-line reason."""


def _missing_manifest(directory: Path, *, hint: str | None = None) -> str | None:
    """Why `directory` has no manifest to read (None when it has one), for each side to raise its
    own error with: not a directory, or no manifest in it (then `hint`, a sentence, follows)."""
    if not directory.is_dir():
        return f"{directory}: no such export directory"
    if not (directory / MANIFEST).is_file():
        reason = f"{directory}: no {MANIFEST}; not an export directory (or an unfinished one)"
        return f"{reason}. {hint}" if hint else reason
    return None


def load_manifest_json(directory: Path, *, hint: str | None = None) -> Any:
    """The manifest's parsed JSON, before either side checks its structure.

    Raises:
        ManifestUnreadable: no directory or manifest (see `_missing_manifest`), or a manifest
            that cannot be read or parsed.
    """
    missing = _missing_manifest(directory, hint=hint)
    if missing is not None:
        raise ManifestUnreadable(missing)
    path = directory / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestUnreadable(f"{path}: unreadable manifest ({exc})") from exc
