"""`UpstreamClient`: the one way the service talks to an upstream OpenAI-compatible LLM API.

It owns one shared `httpx.AsyncClient` (connection pool, keep-alive), a global cap on calls in
flight (an `asyncio.Semaphore`, shared by every request), and per-call policy:

- a per-call deadline (`timeout_s`) covering the wait for a slot, every attempt and the back-off
  sleeps in between; httpx's own connect/read timeouts guard each attempt;
- retries with exponential back-off and jitter on 429, 408, 5xx (not 501/505), connection
  errors and connect timeouts, at most `max_attempts` attempts; `Retry-After` (seconds or an
  HTTP date; OpenAI's `retry-after-ms` too) is honoured, and when it asks for more than
  `retry_after_max_s`, or more than the deadline leaves, the call fails at once instead;
- classification of every failure into a `FailureKind` (rate_limited, http_4xx, http_5xx,
  timeout, connection, malformed), counted in `cappy_upstream_errors_total{kind}` per failed
  attempt; `cappy_upstream_call_duration_seconds{outcome}` observes every attempt (ok, error,
  timeout); `cappy_upstream_retries_total` and `cappy_upstream_in_flight` as named.

Secrets: the API key (configured, or the caller's own bearer token passed per call) only ever
goes into a request header. It is not in the config's repr, log lines, exception messages or
metric labels; upstream error bodies (which can quote a key, e.g. OpenAI's 401 text) are never
copied into messages, only a sanitized `error.code`.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from service import metrics
from service.schemas.text import lone_surrogate_path, repair_lone_surrogates
from service.upstream.errors import FailureKind, UpstreamError, sanitize_identifier

logger = logging.getLogger(__name__)

CHAT_PATH = "chat/completions"
COMPLETIONS_PATH = "completions"
MODELS_PATH = "models"

_NO_RETRY_5XX = frozenset({501, 505})
# Parameter names whose mention in an upstream 4xx body hints at an unsupported parameter.
_MENTION_PATTERNS = {
    name: re.compile(rf"(?<![A-Za-z0-9_\\]){name}(?![A-Za-z0-9_])")
    for name in ("n", "top_k", "seed")
}


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """How to reach the upstream and how hard to try.

    Attributes:
        base_url: the API root including its version prefix, e.g. `https://api.openai.com/v1`
            or `http://127.0.0.1:8080/v1`.
        api_key: the configured key (None: none, or the caller's token passed per call).
        api_key_header: header carrying the key; `authorization` sends `Bearer <key>`, any
            other name (Azure's `api-key`) sends the key as is.
        timeout_s: deadline of one call, all attempts and back-off sleeps included.
        connect_timeout_s: TCP/TLS connect timeout of one attempt.
        max_in_flight: global cap on upstream calls in flight (all requests together).
        max_connections: httpx pool size.
        max_keepalive_connections: idle connections kept open.
        max_attempts: attempts per call (1 = no retries).
        backoff_base_s: first back-off step; doubles per attempt, with jitter.
        backoff_max_s: cap of one back-off step.
        retry_after_max_s: longest `Retry-After` honoured; longer ones fail the call at once.
    """

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    api_key_header: str = "authorization"
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    max_in_flight: int = 64
    max_connections: int = 100
    max_keepalive_connections: int = 32
    max_attempts: int = 3
    backoff_base_s: float = 0.25
    backoff_max_s: float = 8.0
    retry_after_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")


def redact_url(url: str) -> str:
    """The URL without user info or query string (which may carry credentials), for logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


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


class _AttemptFailed(Exception):
    """An attempt failed; `error` is what the caller sees, `retryable` whether to try again."""

    def __init__(self, error: UpstreamError, *, retryable: bool):
        super().__init__(error.message)
        self.error = error
        self.retryable = retryable


class UpstreamClient:
    """Calls an OpenAI-compatible API over one pooled `httpx.AsyncClient`.

    Create it once (in the app's lifespan) and close it with `aclose()`.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ):
        """Args:
        config: the upstream and call policy.
        transport: an httpx transport (tests inject a mock; default: real network).
        sleep: the back-off sleep (tests inject a recorder to keep runs fast).
        rng: jitter source.
        """
        self.config = config
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._semaphore = asyncio.Semaphore(config.max_in_flight)
        self._http = httpx.AsyncClient(
            base_url=config.base_url,
            transport=transport,
            timeout=httpx.Timeout(
                config.timeout_s, connect=config.connect_timeout_s, pool=config.timeout_s
            ),
            limits=httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_keepalive_connections,
            ),
            headers={"user-agent": "cappy-serve"},
            follow_redirects=False,
        )

    @property
    def base_url_redacted(self) -> str:
        return redact_url(self.config.base_url)

    async def aclose(self) -> None:
        """Closes the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- the API --------------------------------------------------------------------------------
    async def chat_completions(
        self, body: Mapping[str, Any], *, api_key: str | None = None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """`POST chat/completions` (non-streaming); returns the validated JSON body.

        Raises:
            UpstreamError: after retries; kind `malformed` when the body is not a chat completion.
        """
        payload = await self.request("POST", CHAT_PATH, body, api_key=api_key, timeout_s=timeout_s)
        return payload

    async def completions(
        self, body: Mapping[str, Any], *, api_key: str | None = None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """`POST completions` (non-streaming); returns the validated JSON body.

        Raises:
            UpstreamError: after retries; kind `malformed` when the body is not a completion.
        """
        return await self.request(
            "POST", COMPLETIONS_PATH, body, api_key=api_key, timeout_s=timeout_s
        )

    async def list_models(
        self, *, api_key: str | None = None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """`GET models`, passed through (an object with a `data` list).

        Raises:
            UpstreamError: after retries.
        """
        return await self.request("GET", MODELS_PATH, None, api_key=api_key, timeout_s=timeout_s)

    async def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        *,
        api_key: str | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """One upstream call with the full policy (slot, deadline, retries, metrics).

        Args:
            method: `GET` or `POST`.
            path: relative to `base_url`: `chat/completions`, `completions` or `models`.
            body: the JSON body (None for GET).
            api_key: the caller's key for this call; None uses the configured key.
            timeout_s: this call's deadline; None uses `config.timeout_s`.

        Raises:
            UpstreamError: the last attempt's error.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout_s if timeout_s is not None else self.config.timeout_s)
        headers = self._auth_headers(api_key)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(method, path, body, headers, deadline)
            except _AttemptFailed as failed:
                error = failed.error
                if not failed.retryable or attempt >= self.config.max_attempts:
                    raise error from None
                delay = self._backoff(attempt, error.retry_after)
                if delay is None or loop.time() + delay >= deadline:
                    raise error from None
                metrics.UPSTREAM_RETRIES.inc()
                logger.info(
                    "upstream %s: %s, retry %d/%d in %.3fs",
                    path,
                    error.describe(),
                    attempt,
                    self.config.max_attempts - 1,
                    delay,
                )
                await self._sleep(delay)

    # --- internals ------------------------------------------------------------------------------
    def _auth_headers(self, api_key: str | None) -> dict[str, str]:
        key = api_key if api_key else self.config.api_key
        if not key:
            return {}
        name = self.config.api_key_header
        if name.lower() == "authorization":
            return {"authorization": f"Bearer {key}"}
        return {name: key}

    def _backoff(self, attempt: int, retry_after: float | None) -> float | None:
        """Delay before the next attempt, or None to give up (Retry-After beyond the cap)."""
        base = self.config.backoff_base_s
        if retry_after is not None:
            if retry_after > self.config.retry_after_max_s:
                return None
            # Honour it, plus a little jitter so synchronized clients don't stampede.
            return retry_after + self._rng.uniform(0, min(base, retry_after * 0.1 + base / 10))
        step = min(self.config.backoff_max_s, base * 2 ** (attempt - 1))
        return step / 2 + self._rng.uniform(0, step / 2)

    async def _attempt(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        headers: dict[str, str],
        deadline: float,
    ) -> dict[str, Any]:
        started: float | None = None
        try:
            async with asyncio.timeout_at(deadline):
                async with self._semaphore:
                    metrics.UPSTREAM_IN_FLIGHT.inc()
                    started = time.perf_counter()
                    try:
                        response = await self._http.request(
                            method, path, json=body, headers=headers
                        )
                    finally:
                        metrics.UPSTREAM_IN_FLIGHT.dec()
        except TimeoutError:
            self._record(started, FailureKind.TIMEOUT)
            raise _AttemptFailed(
                UpstreamError(f"upstream {path} call timed out", kind=FailureKind.TIMEOUT),
                retryable=False,
            ) from None
        except httpx.TimeoutException as exc:
            self._record(started, FailureKind.TIMEOUT)
            # A connect/pool timeout means nothing was sent: trying again is cheap and safe.
            retryable = isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
            raise _AttemptFailed(
                UpstreamError(
                    f"upstream {path} call timed out ({type(exc).__name__})",
                    kind=FailureKind.TIMEOUT,
                ),
                retryable=retryable,
            ) from None
        except httpx.TransportError as exc:
            self._record(started, FailureKind.CONNECTION)
            retryable = isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError)
            raise _AttemptFailed(
                UpstreamError(
                    f"upstream {path} call failed: connection error ({type(exc).__name__})",
                    kind=FailureKind.CONNECTION,
                ),
                retryable=retryable,
            ) from None

        status = response.status_code
        if 200 <= status < 300:
            try:
                payload = _validate_payload(path, response)
            except UpstreamError as malformed:
                self._record(started, FailureKind.MALFORMED)
                raise _AttemptFailed(malformed, retryable=False) from None
            self._record(started, None)
            return payload

        error, retryable = _classify_status(path, response)
        self._record(started, error.kind)
        raise _AttemptFailed(error, retryable=retryable)

    @staticmethod
    def _record(started: float | None, kind: FailureKind | None) -> None:
        if kind is not None:
            metrics.UPSTREAM_ERRORS.labels(kind=kind.value).inc()
        if started is None:  # never got a slot: no upstream call to time
            return
        if kind is None:
            outcome = "ok"
        elif kind is FailureKind.TIMEOUT:
            outcome = "timeout"
        else:
            outcome = "error"
        metrics.UPSTREAM_CALL_DURATION.labels(outcome=outcome).observe(
            time.perf_counter() - started
        )


def _classify_status(path: str, response: httpx.Response) -> tuple[UpstreamError, bool]:
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


def _validate_payload(path: str, response: httpx.Response) -> dict[str, Any]:
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
