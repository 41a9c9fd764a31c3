"""Wire models shared by every route: the OpenAI error envelope, token usage, and what every
request body must satisfy (`RequestModel`: valid Unicode text; `InstructionText`: not blank)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

from service.schemas.text import lone_surrogate_path


class RequestModel(BaseModel):
    """Base of every request body: no text in it, at any depth (unknown fields passed upstream,
    content parts and dict keys included), may hold a lone surrogate.

    Such text (a `\\ud800` escape without its pair) is not Unicode: the tokenizer and the JSON
    writer refuse it. The error (type `lone_surrogate`) carries the path of the text in its
    context as `at`, so the answer's `param` names the field even below a union or a free-form
    object.
    """

    @model_validator(mode="before")
    @classmethod
    def _refuse_lone_surrogates(cls, data: Any) -> Any:
        at = lone_surrogate_path(data)
        if at is not None:
            raise PydanticCustomError(
                "lone_surrogate",
                "the text holds a lone surrogate (a \\ud800-\\udfff escape without its pair), "
                "which is not valid Unicode",
                {"at": ".".join(str(part) for part in at)},
            )
        return data


def _not_blank(text: str) -> str:
    if not text.strip():
        raise PydanticCustomError("empty_field", "must not be empty or only whitespace")
    return text


# The schema says it as a pattern (at least one non-whitespace character); the validator says
# it in words, with one error code for "" and "   " alike.
InstructionText = Annotated[
    str, Field(json_schema_extra={"pattern": r"\S"}), AfterValidator(_not_blank)
]
"""An instruction or query: the text every response is scored against; blank is refused (400,
code `empty_field`) because Cappy's score of a response to nothing means nothing."""


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
        403: "Not allowed (admin routes without API keys configured).",
        404: "Not found.",
        409: "Conflict (another reload is under way, or nothing to reload).",
        413: "Request body or request too large.",
        429: "Overloaded: retry after the number of seconds in Retry-After.",
        500: "Internal error (no details are exposed).",
        502: "The upstream LLM API failed.",
        503: "Not ready (model loading or shutting down).",
        504: "Deadline exceeded.",
    }
    return {code: {"model": ErrorResponse, "description": descriptions[code]} for code in codes}
