"""The OpenAI-shaped answer of a selection: the response (one choice, the winner; usage summed
over every sample), its `x-cappy-*` headers and `cappy` object, and the same answer as
streaming chunks."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from service.schemas.cappy import CappyCandidate, CappyFailure, CappyResponse
from service.schemas.openai import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionDelta,
    ChatCompletionMessage,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionResponse,
)
from service.upstream.best_of_n import Selection
from service.upstream.render import message_text

CHUNK_CHARS = 24
"""Approximate size of one streamed content delta."""


def response_headers(selection: Selection) -> dict[str, str]:
    """Response headers: candidates gathered/planned, the winning decoding, timings,
    substitutions."""
    headers = {
        "x-cappy-candidates": str(len(selection.candidates)),
        "x-cappy-samples-planned": str(selection.planned),
        "x-cappy-winning-decoding": selection.best.decoding,
        "x-cappy-gather-ms": f"{selection.gather_s * 1000:.1f}",
        "x-cappy-slowest-call-ms": f"{selection.slowest_call_s * 1000:.1f}",
        "x-cappy-scoring-ms": f"{selection.scoring_s * 1000:.1f}",
    }
    if selection.substituted:
        headers["x-cappy-substituted"] = ",".join(selection.substituted)
    return headers


def cappy_report(selection: Selection) -> CappyResponse | None:
    """The response's `cappy` object, when the request asked for candidates."""
    if not selection.options.return_candidates:
        return None
    grouped = Counter(
        (f.decoding, f.error.kind.value, f.error.upstream_status) for f in selection.failures
    )
    return CappyResponse(
        winner=selection.winner,
        winning_decoding=selection.best.decoding,
        num_candidates=len(selection.candidates),
        num_planned=selection.planned,
        substituted=list(selection.substituted),
        failures=[
            CappyFailure(decoding=d, kind=k, upstream_status=s, count=c)
            for (d, k, s), c in grouped.items()
        ],
        candidates=[
            CappyCandidate(
                index=c.index,
                decoding=c.decoding,
                text=c.text,
                score=s,
                finish_reason=c.finish_reason,
                substituted=c.substituted,
                seed=c.seed,
            )
            for c, s in zip(selection.candidates, selection.scores, strict=True)
        ],
    )


def build_response(selection: Selection) -> ChatCompletionResponse | CompletionResponse:
    """The OpenAI-shaped response: one choice (the winner), usage summed over all samples, and
    the `cappy` object when the request asked for candidates."""
    best = selection.best
    logprobs = best.choice.get("logprobs")
    common: dict[str, Any] = {
        "id": selection.id,
        "created": selection.created,
        "model": selection.model,
        "usage": selection.usage,
        "system_fingerprint": best.system_fingerprint,
        "cappy": cappy_report(selection),
    }
    finish = {
        "index": 0,
        "finish_reason": best.finish_reason or "stop",
        "logprobs": logprobs if isinstance(logprobs, dict) else None,
    }
    if selection.kind == "chat":
        message = dict(best.choice.get("message") or {})
        message["role"] = "assistant"
        if isinstance(message.get("content"), list):  # content parts: answer with their text
            message["content"] = message_text(message["content"])
        choice = ChatCompletionChoice(
            message=ChatCompletionMessage.model_validate(message), **finish
        )
        return ChatCompletionResponse(**common, choices=[choice])
    return CompletionResponse(**common, choices=[CompletionChoice(text=best.text, **finish)])


def split_text(text: str, chunk_chars: int) -> list[str]:
    """Splits text into pieces of about `chunk_chars`, at whitespace; joins back exactly."""
    if not text:
        return []
    pieces: list[str] = []
    current = ""
    for token in re.findall(r"\s+|\S+\s*", text):
        current += token
        if len(current) >= chunk_chars:
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return pieces


async def stream_chunks(
    selection: Selection, *, include_usage: bool = False, chunk_chars: int = CHUNK_CHARS
) -> AsyncIterator[ChatCompletionChunk | CompletionChunk]:
    """The selected answer as OpenAI streaming chunks.

    Chat: a role delta first, the content in several deltas (tool calls in one delta), a chunk
    with the finish reason (and `cappy` when candidates were asked for), then — with
    `include_usage` — a chunk with `usage` and `choices: []`. Completions: text pieces, the
    finish chunk, the usage chunk. Logprobs are not streamed.
    """
    best = selection.best
    cappy = cappy_report(selection)
    common: dict[str, Any] = {
        "id": selection.id,
        "created": selection.created,
        "model": selection.model,
        "system_fingerprint": best.system_fingerprint,
    }
    if selection.kind == "chat":
        message = best.choice.get("message") or {}
        content = message_text(message.get("content"))

        def chat(delta: ChatCompletionDelta, finish: str | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                **common,
                choices=[ChatCompletionChunkChoice(index=0, delta=delta, finish_reason=finish)],
            )

        yield chat(ChatCompletionDelta(role="assistant", content=""))
        for piece in split_text(content, chunk_chars):
            await asyncio.sleep(0)
            yield chat(ChatCompletionDelta(content=piece))
        if message.get("tool_calls"):
            calls = [
                {"index": i, **call} if isinstance(call, dict) else call
                for i, call in enumerate(message["tool_calls"])
            ]
            yield chat(ChatCompletionDelta(tool_calls=calls))
        if isinstance(message.get("refusal"), str):
            yield chat(ChatCompletionDelta(refusal=message["refusal"]))
        final = chat(ChatCompletionDelta(), best.finish_reason or "stop")
        final.cappy = cappy
        yield final
        if include_usage:
            yield ChatCompletionChunk(**common, choices=[], usage=selection.usage)
        return

    def text_chunk(text: str, finish: str | None = None) -> CompletionChunk:
        return CompletionChunk(
            **common, choices=[CompletionChunkChoice(index=0, text=text, finish_reason=finish)]
        )

    for piece in split_text(best.text, chunk_chars):
        await asyncio.sleep(0)
        yield text_chunk(piece)
    final_text = text_chunk("", best.finish_reason or "stop")
    final_text.cappy = cappy
    yield final_text
    if include_usage:
        yield CompletionChunk(**common, choices=[], usage=selection.usage)
