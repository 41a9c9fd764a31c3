"""The names both sides of the export-directory contract use: model_export writes the directory,
the service reads it, and neither imports the other, so the shared facts live here."""

MANIFEST = "cappy_export.json"
FORMAT = "cappy-export"
