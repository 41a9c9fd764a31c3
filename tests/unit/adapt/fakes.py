"""A scripted OpenAI-compatible upstream for the adapt tests: answers chat and completions calls
deterministically from the call's seed (so re-asking is visible), lists one model, counts every
call, and can crash after N answers or fail chosen calls. It serves an httpx MockTransport
(in-process) or a real HTTP server on 127.0.0.1 (for a CLI run in a subprocess)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from adapt.examples import Example
from adapt.planning import SamplingConfig
from tests.support.servers import serving

BASE = "http://upstream.test/v1"
MODEL = "fake-llm"
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon"]
EXAMPLES = [Example(f"e{i}", f"Question {i}?", ("alpha beta",), "t") for i in range(5)]


def sampling_config(**overrides: Any) -> SamplingConfig:
    """A small run's configuration against the fake: 4 samples per example of 8 tokens."""
    return SamplingConfig(
        **{"model": MODEL, "samples_per_example": 4, "max_tokens": 8, **overrides}
    )


class Crash(Exception):
    """Stands in for the process dying mid-run (not an httpx error: nothing retries it)."""


def answer_text(seed: int) -> str:
    """A sample whose overlap with the reference "alpha beta gamma delta epsilon" depends on the
    seed: 0 to 5 of its words, then filler that matches nothing."""
    keep = seed % 6
    return " ".join(WORDS[:keep] + ["zeta"] * (1 + seed % 3))


def token_logprobs(seed: int, tokens: int) -> list[float]:
    """Per-token log-probabilities, the same for every token of a sample, seed-dependent."""
    return [-0.05 - ((seed // 7) % 10) / 10] * tokens


class FakeUpstream:
    """Counts calls per (prompt, seed); `crash_after` raises Crash at that answer; `fail(body)`
    may return a status code to answer with instead (e.g. 500)."""

    def __init__(
        self,
        *,
        crash_after: int | None = None,
        fail: Callable[[dict[str, Any]], int | None] | None = None,
        delay_s: float = 0.0,
    ):
        self.crash_after = crash_after
        self.fail = fail
        self.delay_s = delay_s
        self.bodies: list[dict[str, Any]] = []
        self.answered = 0
        self.lock = threading.Lock()

    @property
    def calls(self) -> Counter[tuple[str, int]]:
        """Completion calls per (prompt, seed)."""
        return Counter((_prompt(b), int(b["seed"])) for b in self.bodies)

    def respond(self, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        if path.endswith("/models"):
            return 200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
        assert body is not None
        with self.lock:
            if self.crash_after is not None and self.answered >= self.crash_after:
                raise Crash(f"crashed after {self.answered} answers")
            self.bodies.append(body)
            status = self.fail(body) if self.fail else None
            if status is not None:
                return status, {"error": {"message": "scripted failure", "type": "server_error"}}
            self.answered += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        seed = int(body["seed"])
        text = answer_text(seed)
        tokens = len(text.split())
        logprobs = token_logprobs(seed, tokens)
        usage = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}
        if path.endswith("/chat/completions"):
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
            if body.get("logprobs"):
                choice["logprobs"] = {
                    "content": [
                        {"token": w, "logprob": lp, "bytes": None, "top_logprobs": []}
                        for w, lp in zip(text.split(), logprobs, strict=True)
                    ]
                }
            return 200, {
                "object": "chat.completion",
                "model": MODEL,
                "choices": [choice],
                "usage": usage,
            }
        choice = {"index": 0, "text": text, "finish_reason": "stop"}
        if body.get("logprobs") is not None:
            # An echo-style first entry without a value, as some servers send.
            choice["logprobs"] = {"tokens": text.split(), "token_logprobs": [None, *logprobs[1:]]}
        return 200, {
            "object": "text_completion",
            "model": MODEL,
            "choices": [choice],
            "usage": usage,
        }

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        status, payload = self.respond(request.url.path, body)
        return httpx.Response(status, json=payload)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    @contextmanager
    def serve(self) -> Iterator[str]:
        """Serves on a free 127.0.0.1 port; yields the base URL (`.../v1`)."""
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, body: dict[str, Any] | None) -> None:
                try:
                    status, payload = upstream.respond(self.path, body)
                except Crash:
                    status, payload = 500, {"error": {"message": "crash"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._reply(None)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length", "0"))
                self._reply(json.loads(self.rfile.read(length)))

            def log_message(self, *args: object) -> None:
                pass

        with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as root:
            yield f"{root}/v1"


def _prompt(body: dict[str, Any]) -> str:
    if "messages" in body:
        return str(body["messages"][-1]["content"])
    return str(body["prompt"])


def write_examples(path: Any, rows: list[dict[str, Any]]) -> Any:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_examples(
    tasks: int = 2, per_task: int = 3, split: str | None = None
) -> list[dict[str, Any]]:
    """Examples whose reference is the fake's vocabulary, so samples score 0 to 1 in Rouge-L."""
    rows = []
    for t in range(tasks):
        for i in range(per_task):
            row: dict[str, Any] = {
                "task": f"task{t}",
                "id": f"task{t}-{split}-{i}" if split else f"task{t}-{i}",
                "instruction": f"Task {t}, question {i}: list the words.",
                "targets": [" ".join(WORDS), f"answer {t} {i}"],
            }
            if split is not None:
                row["split"] = split
            rows.append(row)
    return rows
