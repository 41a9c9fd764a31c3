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
  timeout); `cappy_upstream_retries_total` and `cappy_upstream_in_flight` as named. What an
  answer says (a valid body, an error's kind, Retry-After) is read by `service.upstream.responses`.

Secrets: the API key (configured, or the caller's own bearer token passed per call) only ever
goes into a request header. It is not in the config's repr, log lines, exception messages or
metric labels; upstream error bodies (which can quote a key, e.g. OpenAI's 401 text) are never
copied into messages, only a sanitized `error.code`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from service import defaults, metrics
from service.upstream.errors import FailureKind, UpstreamError
from service.upstream.responses import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    MODELS_PATH,
    classify_status,
    validate_payload,
)

logger = logging.getLogger(__name__)


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
        max_connections: httpx pool size; None: `max_in_flight`, so that the cap, not the
            pool, decides how many calls run at once (every call holds a connection).
        max_keepalive_connections: idle connections kept open; None: `max_in_flight`.
        max_attempts: attempts per call (1 = no retries).
        backoff_base_s: first back-off step; doubles per attempt, with jitter.
        backoff_max_s: cap of one back-off step.
        retry_after_max_s: longest `Retry-After` honoured; longer ones fail the call at once.
    """

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    api_key_header: str = defaults.UPSTREAM_API_KEY_HEADER
    timeout_s: float = defaults.UPSTREAM_TIMEOUT_S
    connect_timeout_s: float = 5.0
    max_in_flight: int = defaults.UPSTREAM_MAX_IN_FLIGHT
    max_connections: int | None = None
    max_keepalive_connections: int | None = None
    max_attempts: int = defaults.UPSTREAM_MAX_ATTEMPTS
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
        pool, keepalive = config.max_connections, config.max_keepalive_connections
        self._http = httpx.AsyncClient(
            base_url=config.base_url,
            transport=transport,
            timeout=httpx.Timeout(
                config.timeout_s, connect=config.connect_timeout_s, pool=config.timeout_s
            ),
            limits=httpx.Limits(
                max_connections=config.max_in_flight if pool is None else pool,
                max_keepalive_connections=config.max_in_flight if keepalive is None else keepalive,
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
            timed_out = UpstreamError(f"upstream {path} call timed out", kind=FailureKind.TIMEOUT)
            raise self._failed(started, timed_out, retryable=False) from None
        except httpx.TimeoutException as exc:
            timed_out = UpstreamError(
                f"upstream {path} call timed out ({type(exc).__name__})", kind=FailureKind.TIMEOUT
            )
            # A connect/pool timeout means nothing was sent: trying again is cheap and safe.
            retryable = isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
            raise self._failed(started, timed_out, retryable=retryable) from None
        except httpx.TransportError as exc:
            unreachable = UpstreamError(
                f"upstream {path} call failed: connection error ({type(exc).__name__})",
                kind=FailureKind.CONNECTION,
            )
            retryable = isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError)
            raise self._failed(started, unreachable, retryable=retryable) from None

        status = response.status_code
        if 200 <= status < 300:
            try:
                payload = validate_payload(path, response)
            except UpstreamError as malformed:
                raise self._failed(started, malformed, retryable=False) from None
            self._record(started, None)
            return payload

        error, retryable = classify_status(path, response)
        raise self._failed(started, error, retryable=retryable)

    @classmethod
    def _failed(
        cls, started: float | None, error: UpstreamError, *, retryable: bool
    ) -> _AttemptFailed:
        """Records a failed attempt (`started`: when it got its slot) and reports it."""
        cls._record(started, error.kind)
        return _AttemptFailed(error, retryable=retryable)

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
