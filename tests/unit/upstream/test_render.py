"""The text Cappy reads: conversations and prompts rendered as instructions."""

from __future__ import annotations

import pytest

from service.schemas.openai import ChatCompletionRequest
from service.upstream.errors import InvalidProxyRequest
from service.upstream.render import render_chat_instruction, render_completion_prompt


def test_render_chat_instruction():
    one = [{"role": "user", "content": "What is 2+2?"}]
    assert render_chat_instruction(one) == "What is 2+2?"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe"},
                {"type": "image_url", "image_url": {"url": "x"}},
            ],
        },
    ]
    assert render_chat_instruction(conversation) == (
        "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: Describe\n[image_url]"
    )
    tools = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "1"},
    ]
    assert render_chat_instruction(tools) == (
        "User: Weather?\n\nAssistant: [tool call] weather({})\n\nTool: sunny"
    )


def test_render_chat_instruction_budget_keeps_the_last_user_turn():
    long = "x" * 500
    conversation = [
        {"role": "system", "content": "Be brief."},
        *[
            {"role": r, "content": f"{r} {i} {long}"}
            for i in range(4)
            for r in ("user", "assistant")
        ],
        {"role": "user", "content": "The actual question?"},
    ]
    rendered = render_chat_instruction(conversation, max_chars=1200)
    assert len(rendered) <= 1200
    assert rendered.endswith("User: The actual question?")
    assert rendered.startswith("System: Be brief.\n\n[... ")
    assert "earlier messages omitted]" in rendered
    # A budget that only the question fits drops everything else.
    tiny = render_chat_instruction(conversation, max_chars=10)
    assert tiny.endswith("User: The actual question?") and "System" not in tiny
    assert render_chat_instruction(
        ChatCompletionRequest.model_validate({"model": "m", "messages": conversation}).messages
    ) == render_chat_instruction(conversation)


def test_render_completion_prompt():
    assert render_completion_prompt("p") == "p"
    assert render_completion_prompt(["p"]) == "p"
    for bad in (["a", "b"], [1, 2, 3], [[1, 2]]):
        with pytest.raises(InvalidProxyRequest) as info:
            render_completion_prompt(bad)
        assert info.value.param == "prompt" and info.value.http_status == 400
