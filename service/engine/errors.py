"""The engine's domain errors, raised by the batcher and the scorer. They carry no HTTP concepts;
the service's exception handlers decide how each one is answered."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class Overloaded(EngineError):
    """The batcher's queue is full; the request was refused before any work was done.

    Attributes:
        retry_after: seconds after which a retry has a fair chance to be accepted (an estimate
            from recent throughput, always > 0).
    """

    def __init__(self, retry_after: float, message: str = "the scoring queue is full") -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTooLarge(EngineError):
    """A single request needs more tokens than the whole queue may ever hold, or more model time
    than its whole deadline at the model's pace: retrying the same request cannot succeed, so this
    is not an `Overloaded`.

    Attributes:
        tokens: the request's tokens after tokenization.
        limit: the most tokens one request may carry (the queue's capacity, or what the model
            scores before the deadline).
    """

    def __init__(self, tokens: int, limit: int, message: str | None = None) -> None:
        super().__init__(
            message
            or f"the request needs {tokens} tokens; at most {limit} tokens fit in one request"
        )
        self.tokens = tokens
        self.limit = limit


class DeadlineExceeded(EngineError):
    """The request's deadline passed before its pairs were scored; its queued pairs were dropped."""

    def __init__(self, message: str = "the request's deadline passed before it was scored") -> None:
        super().__init__(message)


class EngineStopped(EngineError):
    """The engine is not accepting work: not started yet, shutting down, or its consumer died."""

    def __init__(self, message: str = "the scoring engine is not running") -> None:
        super().__init__(message)


class InferenceFailed(EngineError):
    """The model raised while scoring a batch holding this request's pairs.

    The message is deliberately generic (it may reach a client); the model's own exception is kept
    as `__cause__` for logs.
    """

    def __init__(self, message: str = "model inference failed") -> None:
        super().__init__(message)


class ScorerError(RuntimeError):
    """A backend cannot be built for the requested device, engine or precision."""
