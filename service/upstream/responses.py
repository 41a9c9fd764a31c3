"""What an upstream's answers say: a 2xx body checked (and repaired) as the completion or
model list asked for, and an error answer classified (failure kind, whether a retry may help,
Retry-After, a sanitized error code, the parameters it mentions). Plain functions over httpx
responses; `UpstreamClient` (client.py) makes the calls.

Nothing an upstream sends is copied into a message: only our own words, the status, and a
sanitized `error.code`.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import time
from collections.abc import Mapping
from datetime import UTC
from typing import Any

import httpx

from service import metrics
from service.schemas.text import lone_surrogate_path, repair_lone_surrogates
from service.upstream.errors import FailureKind, UpstreamError, sanitize_identifier
from service.upstream.samplers import SAMPLER_EXTRAS

logger = logging.getLogger(__name__)

CHAT_PATH = "chat/completions"
COMPLETIONS_PATH = "completions"
MODELS_PATH = "models"

_NO_RETRY_5XX = frozenset({501, 505})
# Parameter names whose mention in an upstream 4xx body hints at an unsupported parameter.
_MENTION_PATTERNS = {
    name: re.compile(rf"(?<![A-Za-z0-9_\\]){name}(?![A-Za-z0-9_])")
    for name in ("n", "seed", *SAMPLER_EXTRAS)  # SAMPLER_EXTRAS: top_k, min_p, repeat_penalty
}


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (delta-seconds or an HTTP date).

    Returns None when absent or unparsable; never negative.
    """
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds else None  # NaN guard
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def classify_status(path: str, response: httpx.Response) -> tuple[UpstreamError, bool]:
    """The error a non-2xx answer to `path` is, and whether another attempt may succeed."""
    status = response.status_code
    retry_after = parse_retry_after(response.headers)
    code, mentions = _inspect_error_body(response)
    if status == 429:
        kind, retryable = FailureKind.RATE_LIMITED, True
    elif 500 <= status < 600:
        kind, retryable = FailureKind.HTTP_5XX, status not in _NO_RETRY_5XX
    elif 400 <= status < 500:
        kind, retryable = FailureKind.HTTP_4XX, status == 408
    else:  # 1xx/3xx: not something an OpenAI-compatible API answers
        kind, retryable = FailureKind.MALFORMED, False
    suffix = f" ({code})" if code else ""
    error = UpstreamError(
        f"upstream {path} call failed: HTTP {status}{suffix}",
        kind=kind,
        upstream_status=status,
        upstream_code=code,
        retry_after=retry_after,
        mentions=mentions,
    )
    return error, retryable


def _inspect_error_body(response: httpx.Response) -> tuple[str | None, frozenset[str]]:
    """The sanitized error code and the parameter names an error body mentions."""
    text = response.text[:4096] if response.content else ""
    mentions = frozenset(name for name, rx in _MENTION_PATTERNS.items() if rx.search(text))
    code: str | None = None
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            code = sanitize_identifier(err.get("code")) or sanitize_identifier(err.get("type"))
    return code, mentions


def _malformed(path: str, what: str) -> UpstreamError:
    return UpstreamError(
        f"upstream {path} call returned a malformed response: {what}", kind=FailureKind.MALFORMED
    )


def validate_payload(path: str, response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a 2xx answer to `path`, checked to be what `path` returns and repaired
    (`_repaired`); UpstreamError of kind `malformed` otherwise."""
    try:
        payload = response.json()
    except (ValueError, UnicodeDecodeError):
        raise _malformed(path, "body is not JSON") from None
    if not isinstance(payload, dict):
        raise _malformed(path, "body is not a JSON object")
    if path == MODELS_PATH:
        if not isinstance(payload.get("data"), list):
            raise _malformed(path, "no `data` list")
        return _repaired(path, payload)
    if "error" in payload and "choices" not in payload:
        # Some servers answer 200 with an error object; never treat that as a completion.
        raise _malformed(path, "an error object with status 200")
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _malformed(path, "no `choices`")
    for choice in choices:
        if not isinstance(choice, dict):
            raise _malformed(path, "a choice is not an object")
        if path == CHAT_PATH:
            message = choice.get("message")
            if not isinstance(message, dict):
                raise _malformed(path, "a choice has no `message` object")
            content = message.get("content")
            if content is not None and not isinstance(content, str | list):
                raise _malformed(path, "a message's `content` is not text")
        elif not isinstance(choice.get("text"), str):
            raise _malformed(path, "a choice has no `text`")
    usage = payload.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise _malformed(path, "`usage` is not an object")
    return _repaired(path, payload)


def _repaired(path: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The payload with lone surrogates (JSON's `\\ud800` escapes without their pair: not
    Unicode, so neither scorable nor writable as JSON) replaced by U+FFFD, each repaired choice
    counted in `cappy_upstream_samples_repaired_total{reason="lone_surrogate"}`. One odd sample
    thus neither fails the request nor loses the others."""
    try:
        repaired, changed = repair_lone_surrogates(payload)
    except RecursionError:  # nested deeper than any completion is
        raise _malformed(path, "nested too deeply") from None
    if not changed:
        return payload
    choices = payload.get("choices")
    if isinstance(choices, list):
        bad = sum(1 for choice in choices if lone_surrogate_path(choice) is not None)
        if bad:
            metrics.UPSTREAM_SAMPLES_REPAIRED.labels(reason="lone_surrogate").inc(bad)
            logger.warning(
                "upstream %s: %d sample(s) held lone surrogates; repaired with U+FFFD", path, bad
            )
    result: dict[str, Any] = repaired
    return result
