"""`AdaptError`: the one error type of `cappy adapt` / `cappy eval` whose message is shown to the
user as is (one line, naming the file, flag or record at fault)."""

from __future__ import annotations


class AdaptError(Exception):
    """A bad input or a failed step; `str(exc)` is the one-line message the CLI prints."""
