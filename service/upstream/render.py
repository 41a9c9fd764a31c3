"""The text Cappy reads: the instruction (from a conversation or a completions prompt) and the
text of each upstream sample it scores against that instruction."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from service.upstream.errors import InvalidProxyRequest

_ROLE_LABELS = {
    "system": "System",
    "developer": "System",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
    "function": "Tool",
}


def _field(message: Any, name: str) -> Any:
    if isinstance(message, Mapping):
        return message.get(name)
    return getattr(message, name, None)


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or content parts (non-text parts → `[type]`)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        pieces = []
        for part in content:
            if isinstance(part, Mapping):
                if isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                elif isinstance(part.get("refusal"), str):
                    pieces.append(part["refusal"])
                else:
                    pieces.append(f"[{part.get('type', 'content')}]")
            elif isinstance(part, str):
                pieces.append(part)
        return "\n".join(pieces)
    return str(content)


def _render_tool_calls(tool_calls: Any) -> str:
    lines = []
    for call in tool_calls or []:
        fn = call.get("function", {}) if isinstance(call, Mapping) else {}
        lines.append(f"[tool call] {fn.get('name', '?')}({fn.get('arguments', '')})")
    return "\n".join(lines)


def _render_turn(message: Any) -> str:
    role = str(_field(message, "role") or "user")
    text = message_text(_field(message, "content"))
    calls = _render_tool_calls(_field(message, "tool_calls"))
    body = "\n".join(part for part in (text, calls) if part)
    return f"{_ROLE_LABELS.get(role, role.capitalize())}: {body}"


def render_chat_instruction(messages: Sequence[Any], max_chars: int | None = None) -> str:
    """Renders a conversation as the instruction text Cappy scores responses against.

    Rules:
    - A conversation of one user message is its text verbatim: exactly what a completions prompt
      gives, and the shape Cappy was trained on (instruction → response).
    - Otherwise every message becomes a `Role: text` block (System, User, Assistant, Tool;
      `developer` counts as System), blocks separated by a blank line, in conversation order —
      so the last user turn comes last, unless messages follow it (tool results, an assistant
      prefix), which keep their place after it. Content parts render as their text, other parts
      as `[image_url]` etc.; assistant tool calls as `[tool call] name(arguments)`.
    - Within `max_chars`, the oldest turns before the last user turn are dropped first (then the
      system message), replaced by one `[... N earlier messages omitted]` line, so the question
      being answered survives: the scorer truncates long pairs at 512 tokens, and it would
      otherwise cut from the end. The last user turn and what follows it are never dropped.
    """
    if not messages:
        return ""
    roles = [str(_field(m, "role") or "") for m in messages]
    if len(messages) == 1 and roles[0] == "user":
        return message_text(_field(messages[0], "content"))
    blocks = [_render_turn(m) for m in messages]
    rendered = "\n\n".join(blocks)
    if max_chars is None or len(rendered) <= max_chars:
        return rendered
    last_user = max((i for i, r in enumerate(roles) if r == "user"), default=len(blocks) - 1)
    # Droppable: everything before the last user turn; system/developer messages last.
    droppable = [i for i in range(last_user) if roles[i] not in ("system", "developer")]
    droppable += [i for i in range(last_user) if roles[i] in ("system", "developer")]
    dropped: set[int] = set()

    def assemble() -> str:
        out: list[str] = []
        marker_done = False
        for i, block in enumerate(blocks):
            if i in dropped:
                if not marker_done:
                    out.append(f"[... {len(dropped)} earlier messages omitted]")
                    marker_done = True
                continue
            out.append(block)
        return "\n\n".join(out)

    for i in droppable:
        dropped.add(i)
        rendered = assemble()
        if len(rendered) <= max_chars:
            break
    return rendered


def render_completion_prompt(prompt: Any) -> str:
    """The instruction of a completions request: its one prompt string.

    Raises:
        InvalidProxyRequest: for several prompts or token-id prompts.
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    raise InvalidProxyRequest(
        "prompt must be one string: the best-of-N proxy does not accept several prompts or "
        "token-id prompts",
        param="prompt",
    )


def sample_text(kind: Literal["chat", "text"], choice: Mapping[str, Any]) -> str:
    """The text Cappy scores for one upstream choice: the completion's text, or the message's
    content; a message with no content scores its tool calls (as compact JSON) or its refusal."""
    if kind == "text":
        return str(choice.get("text") or "")
    message = choice.get("message") or {}
    text = message_text(message.get("content"))
    if not text and message.get("tool_calls"):
        return json.dumps(message["tool_calls"], ensure_ascii=False, separators=(",", ":"))
    if not text and isinstance(message.get("refusal"), str):
        return message["refusal"]
    return text
