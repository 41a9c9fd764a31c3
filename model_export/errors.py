"""The one error type of model_export: a problem the user can fix, said in one line."""


class ExportError(Exception):
    """A bad input or a failed step; `str(exc)` is a complete one-line message for the user."""
