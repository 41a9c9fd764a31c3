"""Domain errors of the best-of-N proxy and its upstream client (no HTTP framework here).

Every error carries what an HTTP layer needs to answer in OpenAI's error envelope
(`{"error": {"message", "type", "param", "code"}}`, built by `service.errors`): `http_status`,
`error_type`, `param`, `code`, and a `message` that is safe to show a caller.

Safe means: messages are composed only from our own words, upstream HTTP status codes, failure
kinds and short sanitized identifiers. They never contain an API key, a request header, an
upstream response body or the upstream URL (which may carry credentials). The client raises
these errors `from None` so that no httpx exception (whose text may name the URL) is chained.

Mapping (for the route layer):
- `InvalidProxyRequest` (and `RecipeError`) → 400 `invalid_request_error`.
- `UpstreamError` with kind `timeout` → 504 (`timeout_error`); any other kind → 502
  (`upstream_error`).
- `NotEnoughCandidates` (too few samples arrived) → 504 when every failed call timed out,
  otherwise 502. `retry_after` (seconds or None) may be sent back as a `Retry-After` header.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

_IDENTIFIER = re.compile(r"[^A-Za-z0-9_.:\-]")


def sanitize_identifier(value: object, max_len: int = 64) -> str | None:
    """Reduces an upstream-supplied identifier (error code, type, param) to `[A-Za-z0-9_.:-]`.

    Upstream error codes are useful to a caller ("model_not_found") but are foreign text; only a
    short token of safe characters is kept, never free text.
    """
    if not isinstance(value, str | int) or isinstance(value, bool):
        return None
    cleaned = _IDENTIFIER.sub("", str(value))[:max_len]
    return cleaned or None


class FailureKind(StrEnum):
    """Why an upstream call failed; the label values of `cappy_upstream_errors_total{kind}`."""

    RATE_LIMITED = "rate_limited"
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    MALFORMED = "malformed"


class ProxyError(Exception):
    """Base class: an error the HTTP layer turns into an OpenAI error envelope."""

    http_status: int = 500
    error_type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidProxyRequest(ProxyError):
    """The caller's request cannot be served by the proxy (→ 400)."""

    http_status = 400
    error_type = "invalid_request_error"


class RecipeError(InvalidProxyRequest):
    """A sampling recipe (from the request's `cappy` object or from settings) is invalid."""


class UpstreamError(ProxyError):
    """One upstream call failed for good (after its retries).

    Attributes:
        kind: the failure kind (also the metrics label).
        upstream_status: the upstream's HTTP status code, when it answered.
        upstream_code: the upstream's sanitized `error.code` (or `error.type`), when given.
        retry_after: seconds the upstream asked us to wait (429/503), when given.
        mentions: request parameter names (`n`, `seed`, `top_k`, `min_p`, `repeat_penalty`)
            the upstream's error body mentioned; used only to detect unsupported parameters,
            never shown.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: FailureKind,
        upstream_status: int | None = None,
        upstream_code: str | None = None,
        retry_after: float | None = None,
        mentions: frozenset[str] = frozenset(),
    ):
        super().__init__(message, code=kind.value)
        self.kind = kind
        self.upstream_status = upstream_status
        self.upstream_code = upstream_code
        self.retry_after = retry_after
        self.mentions = mentions

    @property
    def http_status(self) -> int:  # type: ignore[override]
        return 504 if self.kind is FailureKind.TIMEOUT else 502

    @property
    def error_type(self) -> str:  # type: ignore[override]
        return "timeout_error" if self.kind is FailureKind.TIMEOUT else "upstream_error"

    @property
    def is_rejection(self) -> bool:
        """True when the upstream refused the request's parameters (400/422), not an outage."""
        return self.kind is FailureKind.HTTP_4XX and self.upstream_status in (400, 422)

    def describe(self) -> str:
        """A short, secret-free label: `http_5xx (503)`, `timeout`, `http_4xx (404 not_found)`."""
        detail = " ".join(
            str(part) for part in (self.upstream_status, self.upstream_code) if part is not None
        )
        return f"{self.kind.value} ({detail})" if detail else self.kind.value


@dataclass(frozen=True, slots=True)
class SampleFailure:
    """One planned sample that did not arrive: which decoding, and why."""

    decoding: str
    error: UpstreamError


class NotEnoughCandidates(UpstreamError):
    """Fewer than `min_candidates` samples arrived; names what failed, without secrets."""

    def __init__(
        self,
        *,
        arrived: int,
        planned: int,
        min_candidates: int,
        failures: Iterable[SampleFailure],
    ):
        failures = list(failures)
        timed_out = bool(failures) and all(f.error.kind is FailureKind.TIMEOUT for f in failures)
        by_cause = Counter((f.decoding, f.error.describe()) for f in failures)
        causes = "; ".join(
            f"{decoding} x{count}: {cause}" for (decoding, cause), count in by_cause.items()
        )
        message = (
            f"upstream failed: {arrived} of {planned} samples arrived, at least {min_candidates} "
            f"required. Failed: {causes or 'none'}."
        )
        retry_after = max(
            (f.error.retry_after for f in failures if f.error.retry_after is not None),
            default=None,
        )
        super().__init__(
            message,
            kind=FailureKind.TIMEOUT if timed_out else _dominant_kind(failures),
            retry_after=retry_after,
        )
        self.arrived = arrived
        self.planned = planned
        self.min_candidates = min_candidates
        self.failures = failures


def _dominant_kind(failures: list[SampleFailure]) -> FailureKind:
    """The most frequent non-timeout kind (a mix with some timeouts is still a 502)."""
    kinds = Counter(f.error.kind for f in failures if f.error.kind is not FailureKind.TIMEOUT)
    return kinds.most_common(1)[0][0] if kinds else FailureKind.CONNECTION
