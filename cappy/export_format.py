"""The names both sides of the export-directory contract use: model_export writes the directory,
the service reads it, and neither imports the other, so the shared facts live here."""

from __future__ import annotations

from pathlib import Path

MANIFEST = "cappy_export.json"
FORMAT = "cappy-export"


def missing_manifest(directory: Path, *, hint: str | None = None) -> str | None:
    """Why `directory` has no manifest to read (None when it has one), for each side to raise its
    own error with: not a directory, or no manifest in it (then `hint`, a sentence, follows)."""
    if not directory.is_dir():
        return f"{directory}: no such export directory"
    if not (directory / MANIFEST).is_file():
        reason = f"{directory}: no {MANIFEST}; not an export directory (or an unfinished one)"
        return f"{reason}. {hint}" if hint else reason
    return None
