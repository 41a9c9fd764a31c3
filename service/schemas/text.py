"""Lone surrogates: text that JSON can carry but that is not Unicode.

JSON may escape a UTF-16 surrogate on its own (`"\\ud800"`). Python's json module decodes it into
a `str` holding a lone surrogate code point, which no UTF-8 encoder, tokenizer or JSON writer
accepts. The request schemas refuse such text (400, naming the field: `lone_surrogate_path`);
text that arrives from an upstream LLM API is repaired instead (`repair_lone_surrogates`), so one
odd sample cannot fail a whole proxy request. A valid surrogate pair (`"\\ud83d\\ude00"`) decodes
to one code point and is not affected.

Plain functions over JSON-shaped values (str, list, dict): no framework here.
"""

from __future__ import annotations

import re
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"

PathPart = str | int


def has_lone_surrogate(text: str) -> bool:
    """Whether `text` holds a surrogate code point (always unpaired in a Python str)."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def lone_surrogate_path(value: Any) -> tuple[PathPart, ...] | None:
    """Where the first text holding a lone surrogate sits in `value`, in document order, or None.

    Dict keys are checked too: the path then ends at that key, repaired (U+FFFD in place of the
    surrogate) so that the path itself is printable. The walk is iterative: a deeply nested body
    cannot overflow the stack here.
    """
    stack: list[tuple[Any, tuple[PathPart, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if has_lone_surrogate(item):
                return path
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                if isinstance(key, str) and has_lone_surrogate(key):
                    return (*path, repair_text(key))
                children.append((child, (*path, key)))
            stack.extend(reversed(children))
        elif isinstance(item, list | tuple):
            stack.extend(reversed([(child, (*path, i)) for i, child in enumerate(item)]))
    return None


def repair_text(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD (the Unicode replacement character)."""
    return _SURROGATE.sub(REPLACEMENT, text) if has_lone_surrogate(text) else text


def repair_lone_surrogates(value: Any) -> tuple[Any, bool]:
    """`value` with every text (dict keys included) repaired by `repair_text`, and whether
    anything was repaired. Returns `value` itself when nothing needed repairing."""
    if lone_surrogate_path(value) is None:
        return value, False
    return _repair(value), True


def _repair(value: Any) -> Any:
    # Only reached for values that hold a surrogate somewhere; depth is what json.loads built.
    if isinstance(value, str):
        return repair_text(value)
    if isinstance(value, dict):
        return {repair_text(k) if isinstance(k, str) else k: _repair(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_repair(v) for v in value]
    return value
