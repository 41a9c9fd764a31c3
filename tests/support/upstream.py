"""Fakes for the best-of-N proxy's unit tests: a scripted OpenAI-compatible upstream (an httpx
MockTransport handler), a recording ranking function, and small helpers."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from service import metrics
from service.schemas.openai import ChatCompletionRequest, CompletionRequest
from service.upstream.best_of_n import BestOfN, Selection
from service.upstream.recipe import ProxyOptions, Recipe, resolve_options

BASE = "http://upstream.test/v1"
SECRET = "sk-test-SECRET-0123456789abcdef"
PROMPT_TOKENS = 10
TOKENS_PER_CHOICE = 5
PAPER_COUNTS = {"sampling": 4, "temperature_0.9": 4, "top_k_40": 4, "top_p_0.95": 4, "greedy": 1}


class FakeUpstream:
    """A scripted OpenAI-compatible server.

    n_mode: "honour" (n choices), "reject" (400 on n > 1, like llama.cpp's C++ server),
    "ignore" (one choice whatever n is, like llama-cpp-python). top_k: "accept" or "reject".
    fail(body, call_index) may return a response to send instead. block: an event every call
    waits on first (None: no waiting).
    """

    def __init__(
        self,
        *,
        n_mode: str = "honour",
        top_k: str = "accept",
        fail: Callable[[dict, int], httpx.Response | None] | None = None,
        block: asyncio.Event | None = None,
        block_if: Callable[[dict], bool] | None = None,
    ):
        self.n_mode = n_mode
        self.top_k = top_k
        self.fail = fail
        self.block = block
        self.block_if = block_if or (lambda _body: True)
        self.bodies: list[dict] = []
        self.started = 0
        self.cancelled = 0

    async def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        index = len(self.bodies)
        self.bodies.append(body)
        if self.block is not None and self.block_if(body):
            self.started += 1
            try:
                await self.block.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.fail is not None:
            response = self.fail(body, index)
            if response is not None:
                return response
        if "top_k" in body and self.top_k == "reject":
            return httpx.Response(
                400, json={"error": {"message": "Unrecognized request argument supplied: top_k"}}
            )
        n = body.get("n", 1)
        if n > 1 and self.n_mode == "reject":
            return httpx.Response(
                400, json={"error": {"message": "Only one completion choice is allowed"}}
            )
        count = 1 if self.n_mode == "ignore" else n
        chat = request.url.path.endswith("chat/completions")
        choices = []
        for i in range(count):
            text = (
                f"answer t={body.get('temperature')} p={body.get('top_p')} "
                f"k={body.get('top_k')} seed={body.get('seed')} #{i}"
            )
            choice = {"index": i, "finish_reason": "stop" if i % 2 == 0 else "length"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        return httpx.Response(
            200,
            json={
                "id": f"up-{index}",
                "object": "chat.completion" if chat else "text_completion",
                "created": 1,
                "model": "fake-model",
                "system_fingerprint": "fp_fake",
                "choices": choices,
                "usage": {
                    "prompt_tokens": PROMPT_TOKENS,
                    "completion_tokens": TOKENS_PER_CHOICE * count,
                    "total_tokens": PROMPT_TOKENS + TOKENS_PER_CHOICE * count,
                },
            },
        )


@dataclass(frozen=True, slots=True)
class Ranked:
    """One result of the test ranking function (the runtime's `ScoredPair` has more)."""

    score: float


class Scorer:
    """Test scorer: `fn(texts)` gives the scores (default: text length); records its calls."""

    def __init__(self, fn: Callable[[list[str]], list[float]] | None = None):
        self.fn = fn or (lambda texts: [float(len(t)) for t in texts])
        self.calls: list[tuple[str, list[str]]] = []

    async def __call__(self, instruction: str, texts: Sequence[str]) -> list[Ranked]:
        self.calls.append((instruction, list(texts)))
        return [Ranked(score) for score in self.fn(list(texts))]


async def select(
    proxy: BestOfN, request: ChatCompletionRequest | CompletionRequest, opts: ProxyOptions
) -> Selection:
    """Prepares the request and runs its selection, as the route does."""
    return await proxy.select(proxy.prepare(request), opts)


def chat_request(**extra) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "smol", "messages": [{"role": "user", "content": "Name a color."}], **extra}
    )


def options(cappy: dict | None = None) -> ProxyOptions:
    return resolve_options(cappy, default_recipe=Recipe.default())


def decoding_counts(selection) -> dict[str, int]:
    return dict(Counter(c.decoding for c in selection.candidates))


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or None) or 0.0


def fail_when(predicate: Callable[[dict], bool], status: int = 500):
    def fail(body: dict, _index: int) -> httpx.Response | None:
        if predicate(body):
            return httpx.Response(status, json={"error": {"message": "boom", "code": None}})
        return None

    return fail


async def wait_for(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)
