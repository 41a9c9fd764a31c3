"""Wire models shared by every route: the OpenAI error envelope and token usage."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    message: str = Field(description="What went wrong, for a person to read.")
    type: str = Field(
        description="Error class: invalid_request_error, authentication_error, "
        "rate_limit_error, not_found_error, upstream_error, timeout_error, server_error."
    )
    param: str | None = Field(None, description="The request field at fault, if one is.")
    code: str | None = Field(None, description="A stable machine-readable code, if any.")


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens the scorer read (all pairs, after truncation).")
    total_tokens: int = Field(description="Same as prompt_tokens: the scorer generates nothing.")


def error_responses(*codes: int) -> dict[int | str, dict[str, object]]:
    """`responses=` for a route: each code documented with the error envelope."""
    descriptions = {
        400: "Invalid request (missing or empty field, wrong type, over a limit, bad JSON).",
        401: "Missing or invalid API key.",
        404: "Not found.",
        413: "Request body or request too large.",
        429: "Overloaded: retry after the number of seconds in Retry-After.",
        500: "Internal error (no details are exposed).",
        502: "The upstream LLM API failed.",
        503: "Not ready (model loading or shutting down).",
        504: "Deadline exceeded.",
    }
    return {code: {"model": ErrorResponse, "description": descriptions[code]} for code in codes}
