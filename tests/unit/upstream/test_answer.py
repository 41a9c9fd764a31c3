"""The OpenAI-shaped answer of a selection: responses and streaming chunks as the openai SDK
parses them, tool calls, content parts."""

from __future__ import annotations

import json

import httpx
import openai.types as oai
import openai.types.chat as oai_chat

from service.schemas.openai import CompletionRequest
from service.upstream.answer import build_response, split_text, stream_chunks
from tests.support.upstream import (
    FakeUpstream,
    Scorer,
    chat_request,
    options,
    select,
)


async def test_chat_response_is_a_valid_openai_chat_completion(make_proxy):
    selection = await select(make_proxy(FakeUpstream()), chat_request(), options())
    response = build_response(selection)
    wire = response.model_dump(mode="json", exclude_none=True)
    parsed = oai_chat.ChatCompletion.model_validate(wire)
    assert parsed.id.startswith("chatcmpl-") and parsed.model == "fake-model"
    assert parsed.choices[0].message.content == selection.best.text
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.system_fingerprint == "fp_fake"
    assert "cappy" not in wire  # only with return_candidates
    assert len(response.choices) == 1


async def test_completion_response_is_a_valid_openai_completion(make_proxy):
    upstream = FakeUpstream()
    selection = await select(
        make_proxy(upstream),
        CompletionRequest(model="m", prompt="Once upon", max_tokens=8),
        options({"return_candidates": True}),
    )
    assert all(b["prompt"] == "Once upon" for b in upstream.bodies)
    wire = build_response(selection).model_dump(mode="json", exclude_none=True)
    parsed = oai.Completion.model_validate(wire)
    assert parsed.object == "text_completion" and parsed.id.startswith("cmpl-")
    assert parsed.choices[0].text == selection.best.text
    assert wire["cappy"]["num_candidates"] == 17 and len(wire["cappy"]["candidates"]) == 17
    assert parsed.usage is not None and parsed.usage.completion_tokens == 85


def test_split_text_rejoins_exactly():
    text = "  The quick brown fox\njumps over   the lazy dog. "
    pieces = split_text(text, 8)
    assert "".join(pieces) == text and len(pieces) > 2
    assert split_text("", 8) == []


async def test_chat_stream_chunks(make_proxy):
    selection = await select(
        make_proxy(FakeUpstream()), chat_request(), options({"return_candidates": True})
    )
    chunks = [c async for c in stream_chunks(selection, include_usage=True, chunk_chars=8)]
    wires = [c.model_dump(mode="json", exclude_none=True) for c in chunks]
    parsed = [oai_chat.ChatCompletionChunk.model_validate(w) for w in wires]
    assert {p.id for p in parsed} == {selection.id}
    assert parsed[0].choices[0].delta.role == "assistant"
    content = [p.choices[0].delta.content or "" for p in parsed if p.choices]
    assert "".join(content) == selection.best.text and sum(map(bool, content)) >= 3
    finish = parsed[-2]
    assert finish.choices[0].finish_reason == selection.best.finish_reason
    assert wires[-2]["cappy"]["winner"] == selection.winner
    assert parsed[-1].choices == [] and parsed[-1].usage is not None
    assert parsed[-1].usage.total_tokens == selection.usage.total_tokens
    assert all(p.usage is None for p in parsed[:-1])
    without = [c async for c in stream_chunks(selection)]
    assert without[-1].choices and without[-1].choices[0].finish_reason


async def test_completion_stream_chunks(make_proxy):
    selection = await select(
        make_proxy(FakeUpstream()), CompletionRequest(model="m", prompt="p"), options()
    )
    chunks = [c async for c in stream_chunks(selection, include_usage=True, chunk_chars=8)]
    wires = [json.loads(c.model_dump_json(exclude_none=True)) for c in chunks]
    # As OpenAI streams them: every choice carries finish_reason, null until the last one.
    assert all("finish_reason" in ch for w in wires for ch in w["choices"])
    assert [w["choices"][0]["finish_reason"] for w in wires[:-1]][:-1] == [None] * (len(wires) - 2)
    assert "".join(w["choices"][0]["text"] for w in wires if w["choices"]) == selection.best.text
    assert {w["object"] for w in wires} == {"text_completion"}
    final = oai.Completion.model_validate(wires[-2])  # the finish chunk is a full Completion
    assert final.choices[0].finish_reason == selection.best.finish_reason
    assert wires[-1]["choices"] == [] and wires[-1]["usage"]["completion_tokens"] == 85


async def test_tool_call_winner_is_kept_and_streamed(make_proxy):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}

    def fail(_body: dict, _index: int) -> httpx.Response:
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        return httpx.Response(
            200,
            json={
                "model": "m",
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
            },
        )

    scorer = Scorer()
    selection = await select(
        make_proxy(FakeUpstream(fail=fail), scorer, n_support="no"), chat_request(), options()
    )
    assert scorer.calls[0][1][0] == json.dumps([call], separators=(",", ":"))
    message = build_response(selection).choices[0].message
    assert message.tool_calls == [call] and message.content is None
    chunks = [c async for c in stream_chunks(selection)]
    deltas = [c.choices[0].delta for c in chunks]
    assert any(d.tool_calls == [{"index": 0, **call}] for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_content_parts_from_the_upstream_become_text(make_proxy):
    def parts(_body: dict, _index: int) -> httpx.Response:
        message = {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return httpx.Response(200, json={"model": "m", "choices": [choice]})

    selection = await select(
        make_proxy(FakeUpstream(fail=parts), n_support="no"), chat_request(), options()
    )
    assert selection.best.text == "blue"
    assert build_response(selection).choices[0].message.content == "blue"
