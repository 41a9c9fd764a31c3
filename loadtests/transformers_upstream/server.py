"""HTTP with the standard library: the OpenAI request shapes read into rows for the batcher, and
its outputs written back as OpenAI responses.

What a request may carry (anything else is ignored, as llama-cpp-python ignores it):
`temperature` (0 = greedy; default 1), `top_p` (default 1), `top_k` (0 or absent: off), `min_p`
(default 0), `repeat_penalty` or `repetition_penalty` (default 1: off), `max_tokens` /
`max_completion_tokens` (default `--default-max-tokens`), `seed` (absent: a random one), `stop`
(a string or a list of up to 4), `n` (that many choices, each its own row, seeds seed + i),
`logprobs` (chat: true, with `top_logprobs` 0-20; completions: an integer 0-20, the alternatives
per token). Refused with 400: `stream`, `echo`, `best_of` > 1, values out of range.

Log-probabilities are the chosen tokens' under the model's raw distribution (before temperature
and the cut-offs): chat `choices[i].logprobs.content[{token, logprob, bytes, top_logprobs}]`,
completions `choices[i].logprobs.{tokens, token_logprobs, top_logprobs, text_offset}`.
Errors use OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from loadtests.transformers_upstream.batcher import Batcher, Overloaded, Stopped
from loadtests.transformers_upstream.engine import Engine, Row, RowOutput
from loadtests.transformers_upstream.sampling import SamplingParams

logger = logging.getLogger(__name__)

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOPS = 4
_SEED_RANGE = 2**63


class BadRequest(ValueError):
    """A request the server refuses (400), naming the parameter."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Limits:
    """What the server allows a request."""

    default_max_tokens: int = 256
    max_tokens: int = 2048
    request_timeout_s: float = 600.0


@dataclass(frozen=True, slots=True)
class Parsed:
    """A request read: its rows and what the response needs."""

    rows: list[Row]
    prompt_tokens: int
    stops: tuple[str, ...]
    logprobs: bool
    top_logprobs: int


def _number(
    body: dict[str, Any],
    name: str,
    default: float,
    low: float,
    high: float,
    *,
    aliases: tuple[str, ...] = (),
) -> float:
    value = next((body[k] for k in (name, *aliases) if body.get(k) is not None), None)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"`{name}` must be a number", name)
    if not low <= value <= high:
        raise BadRequest(f"`{name}` must be between {low} and {high}, got {value}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"`{name}` must be an integer", name)
    if not low <= value <= high:
        raise BadRequest(f"`{name}` must be between {low} and {high}, got {value}", name)
    return value


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest("`stop` must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise BadRequest(f"`stop` takes at most {MAX_STOPS} strings", "stop")
    return tuple(s for s in stops if s)


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "".join(p for p in parts if isinstance(p, str))
    if content is None:
        return ""
    raise BadRequest("a message's `content` must be text", "messages")


class Api:
    """The requests' meaning: parsing, running through the batcher, the responses."""

    def __init__(
        self, engine: Engine, batcher: Batcher, model_name: str, limits: Limits | None = None
    ) -> None:
        self.engine = engine
        self.batcher = batcher
        self.model_name = model_name
        self.limits = limits or Limits()
        self.created = int(time.time())
        self._rng = random.SystemRandom()
        # The fast tokenizer is shared by every HTTP thread, and a call may set its padding or
        # truncation state ("Already borrowed" when two threads do): one at a time.
        self._tokenizer_lock = threading.Lock()

    # -- reading a request

    def parse(self, body: dict[str, Any], kind: str) -> Parsed:
        for refused in ("stream", "echo"):
            if body.get(refused):
                raise BadRequest(f"`{refused}` is not supported by this server", refused)
        if _integer(body, "best_of", 1, 1, 1) != 1:
            raise BadRequest("`best_of` must be 1", "best_of")
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("`messages` must be a non-empty list", "messages")
            rendered = []
            for m in messages:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise BadRequest("each message needs a `role`", "messages")
                rendered.append({"role": m["role"], "content": _message_text(m.get("content"))})
            prompt_ids = self._tokenize(lambda: self.engine.chat_prompt(rendered))
            wants_logprobs = bool(body.get("logprobs"))
            top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if wants_logprobs else 0
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise BadRequest("`prompt` must be one string", "prompt")
            prompt_ids = self._tokenize(lambda: self.engine.text_prompt(prompt))
            wants_logprobs = body.get("logprobs") is not None and body.get("logprobs") is not False
            top = _integer(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS) if wants_logprobs else 0
        max_tokens = int(
            _number(
                body,
                "max_tokens",
                self.limits.default_max_tokens,
                1,
                self.limits.max_tokens,
                aliases=("max_completion_tokens",),
            )
        )
        if len(prompt_ids) + max_tokens > self.engine.max_context:
            raise BadRequest(
                f"{len(prompt_ids)} prompt tokens + max_tokens {max_tokens} exceed the model's "
                f"context of {self.engine.max_context}",
                "max_tokens",
            )
        n = _integer(body, "n", 1, 1, MAX_N)
        seed = body.get("seed")
        if seed is None:
            seed = self._rng.randrange(_SEED_RANGE)
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise BadRequest("`seed` must be an integer", "seed")
        temperature = _number(body, "temperature", 1.0, 0.0, 5.0)
        common: dict[str, Any] = {
            "temperature": temperature,
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
            "top_k": _integer(body, "top_k", 0, 0, 1_000_000),
            "min_p": _number(body, "min_p", 0.0, 0.0, 1.0),
            "repetition_penalty": _number(
                body, "repeat_penalty", 1.0, 1e-3, 10.0, aliases=("repetition_penalty",)
            ),
        }
        rows = [
            Row(
                prompt_ids=prompt_ids,
                params=SamplingParams(seed=seed + i, **common),
                max_new_tokens=max_tokens,
                top_logprobs=top,
            )
            for i in range(n)
        ]
        return Parsed(rows, len(prompt_ids), _stops(body), wants_logprobs, top)

    def _tokenize(self, render: Callable[[], list[int]]) -> list[int]:
        with self._tokenizer_lock:
            try:
                return list(render())
            except BadRequest:
                raise
            except Exception as exc:
                raise BadRequest(f"the prompt could not be rendered: {exc}") from None

    # -- answering

    def complete(self, body: dict[str, Any], kind: str) -> dict[str, Any]:
        """The response body of a chat or text completion (`kind`: chat or completions)."""
        parsed = self.parse(body, kind)
        outputs = self.batcher.submit(parsed.rows).wait(self.limits.request_timeout_s)
        choices = []
        completion_tokens = 0
        for index, output in enumerate(outputs):
            text, count, stopped = self._text(output, parsed.stops)
            completion_tokens += count
            finish = "stop" if stopped else output.finish
            choice: dict[str, Any] = {"index": index, "finish_reason": finish}
            logprobs = self._logprobs(output, count, kind, parsed) if parsed.logprobs else None
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choice["logprobs"] = logprobs
            choices.append(choice)
        prefix, obj = (
            ("chatcmpl", "chat.completion") if kind == "chat" else ("cmpl", "text_completion")
        )
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": obj,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": parsed.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": parsed.prompt_tokens + completion_tokens,
            },
        }

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return str(self.engine.tokenizer.decode(ids, skip_special_tokens=True))

    def _text(self, output: RowOutput, stops: tuple[str, ...]) -> tuple[str, int, bool]:
        """The reply's text, the tokens it took, and whether a stop string ended it (the text
        then ends before it, and the tokens counted are those up to the one completing it)."""
        text = self._decode(output.token_ids)
        found = [(text.find(s), s) for s in stops if s in text]
        if not found:
            return text, len(output.token_ids), False
        cut, stop = min(found)
        for count in range(1, len(output.token_ids) + 1):
            if stop in self._decode(output.token_ids[:count]):
                return text[:cut], count, True
        return text[:cut], len(output.token_ids), True

    def _token_text(self, token: int) -> str:
        return self._decode([token])

    def _logprobs(self, output: RowOutput, count: int, kind: str, parsed: Parsed) -> dict[str, Any]:
        ids, values = output.token_ids[:count], output.logprobs[:count]
        tops = (output.top or [])[:count]
        if kind == "chat":
            content = []
            for s, (token, value) in enumerate(zip(ids, values, strict=True)):
                piece = self._token_text(token)
                alternatives = [
                    {
                        "token": self._token_text(t),
                        "logprob": v,
                        "bytes": list(self._token_text(t).encode()),
                    }
                    for t, v in (tops[s] if s < len(tops) else [])
                ]
                content.append(
                    {
                        "token": piece,
                        "logprob": value,
                        "bytes": list(piece.encode()),
                        "top_logprobs": alternatives,
                    }
                )
            return {"content": content}
        tokens = [self._token_text(t) for t in ids]
        offsets, at = [], 0
        for piece in tokens:
            offsets.append(at)
            at += len(piece)
        top = (
            [{self._token_text(t): v for t, v in step} for step in tops]
            if parsed.top_logprobs > 0
            else None
        )
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "loadtests.transformers_upstream",
                }
            ],
        }

    def stats(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "device": str(self.engine.device),
            "max_rows": self.batcher.max_rows,
            "max_batch_tokens": self.batcher.max_batch_tokens,
            "max_wait_ms": round(self.batcher.max_wait_s * 1000, 1),
            "batcher": self.batcher.stats(),
            "engine": self.engine.stats.to_dict(),
        }


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Handler(BaseHTTPRequestHandler):
    """One connection's requests (HTTP/1.1 keep-alive), answered through the server's `Api`."""

    protocol_version = "HTTP/1.1"
    # The headers and the body go out as two writes: without TCP_NODELAY the second waits for
    # the client's delayed ACK (~40 ms a response).
    disable_nagle_algorithm = True
    server: UpstreamServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        logger.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        api = self.server.api
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            self._send(200, api.models())
        elif path == "/health":
            alive = api.batcher.alive
            self._send(200 if alive else 503, {"status": "ok" if alive else "batcher stopped"})
        elif path == "/stats":
            self._send(200, api.stats())
        else:
            self._send(404, error_body(f"no route {path}", "not_found_error"))

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0].rstrip("/")
        kinds = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
        kinds.update({"/chat/completions": "chat", "/completions": "completions"})
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if path not in kinds:
            self._send(404, error_body(f"no route {path}", "not_found_error"))
            return
        try:
            body = json.loads(raw or b"null")
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            self._send(200, self.server.api.complete(body, kinds[path]))
        except json.JSONDecodeError as exc:
            self._send(400, error_body(f"the body is not JSON: {exc.msg}", "invalid_request_error"))
        except BadRequest as exc:
            self._send(400, error_body(str(exc), "invalid_request_error", exc.param))
        except ValueError as exc:  # a request too large for one batch
            self._send(400, error_body(str(exc), "invalid_request_error"))
        except Overloaded as exc:
            self._send(429, error_body(f"overloaded: {exc}", "rate_limit_error"))
        except (Stopped, TimeoutError) as exc:
            self._send(503, error_body(str(exc), "server_error"))
        except Exception:
            logger.exception("request failed")
            self._send(500, error_body("internal error (see the server's log)", "server_error"))


class UpstreamServer(ThreadingHTTPServer):
    """A thread per connection; a deep listen backlog, since a client opens thousands of
    connections at once."""

    daemon_threads = True
    request_queue_size = 4096
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], api: Api) -> None:
        super().__init__(address, Handler)
        self.api = api

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        return f"http://{name}:{port}/v1"
