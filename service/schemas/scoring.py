"""Wire models of the scoring routes: /score, /select, /v1/rerank (Cohere v1 / Jina) and
/v2/rerank (Cohere v2).

Requests are strict: unknown fields are refused, numbers and booleans are not coerced from
strings (`"top_n": "2"` is a 400), and no text may hold a lone surrogate (`RequestModel`).
Instructions and queries must not be blank; responses, candidates and documents may be empty
(an empty answer is a legitimate candidate, and scores low).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.schemas.common import InstructionText, RequestModel, Usage

ScorerName = Annotated[str | None, Field(description="Ignored if it names the served scorer.")]
"""A request's `model`: accepted for client compatibility, never a choice of scorer."""


def _whole_number(value: Any) -> Any:
    """383.0 -> 383: JSON Schema's integer is any number without a fractional part, and
    clients (Cohere's own API takes `top_n: 383.0`) send them so; 383.5 stays a float, and is
    refused as not an integer."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# The constraint before the validator: the schema then says `minimum`, not a bare `ge`.
PositiveInteger = Annotated[int, Field(strict=True, ge=1), BeforeValidator(_whole_number)]
"""At least 1, an integer as JSON Schema means it: 3 or 3.0, never 3.5, "3" or true."""


def _strict(example: dict[str, Any]) -> ConfigDict:
    """A request's config: unknown fields refused; `example` shown in the API docs."""
    return ConfigDict(extra="forbid", json_schema_extra={"examples": [example]})


class Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instruction: InstructionText = Field(
        description="The instruction (prompt); scored first. Must not be blank."
    )
    response: str = Field(description="The response to rate against the instruction; may be empty.")


class ScoreRequest(RequestModel):
    model_config = _strict(
        {
            "pairs": [
                {"instruction": "What is the capital of France?", "response": "Paris."},
                {"instruction": "What is the capital of France?", "response": "Lyon."},
            ]
        }
    )

    pairs: list[Pair] = Field(min_length=1, description="(instruction, response) pairs to score.")
    model: ScorerName = None


class PairScore(BaseModel):
    index: int = Field(description="Position of the pair in the request.")
    score: float = Field(
        description="Cappy's raw regression output (mostly in [0, 1], not clipped)."
    )
    truncated: bool = Field(description="Whether the pair was cut to the model's max length.")


class ScoreResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str = Field(description="The scorer that produced the scores.")
    data: list[PairScore] = Field(description="One score per pair, in the request's order.")
    usage: Usage


class SelectRequest(RequestModel):
    model_config = _strict(
        {
            "instruction": "Is this review positive or negative? 'Loved it.'",
            "candidates": ["positive", "negative"],
        }
    )

    instruction: InstructionText = Field(
        description="The instruction every candidate answers. Must not be blank."
    )
    candidates: list[str] = Field(
        min_length=1, description="Candidate responses; a candidate may be empty."
    )
    top_n: PositiveInteger | None = Field(
        None,
        description="Length of the returned ranking (default: all candidates); an integer.",
    )
    model: ScorerName = None


class RankedCandidate(BaseModel):
    index: int = Field(description="Position of the candidate in the request.")
    score: float = Field(description="Cappy's raw score.")
    truncated: bool = Field(description="Whether the pair was cut to the model's max length.")


class SelectResponse(BaseModel):
    model: str
    index: int = Field(description="Index of the best candidate (ties: the lowest index).")
    candidate: str = Field(description="The best candidate's text.")
    score: float = Field(description="The best candidate's score.")
    ranking: list[RankedCandidate] = Field(description="Candidates by score, best first.")
    usage: Usage


class DocumentText(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="The document's text; may be empty.")


def _as_document(value: Any) -> Any:
    return {"text": value} if isinstance(value, str) else value


# A document is a string or a {text} object on the wire, one model inside. Not a union: a
# union's errors name its members ("documents.0.str") instead of the field.
Document = Annotated[
    DocumentText, BeforeValidator(_as_document, json_schema_input_type=str | DocumentText)
]


class _RerankRequest(RequestModel):
    """What the Cohere v1 / Jina and the Cohere v2 rerank requests share; they differ after the
    query (and `top_n` follows `documents` on both wires)."""

    model: ScorerName = None
    query: InstructionText = Field(description="The query (Cappy's instruction). Not blank.")


TopN = Annotated[
    PositiveInteger | None,
    Field(description="How many results (default: all); an integer."),
]


class RerankRequest(_RerankRequest):
    """Cohere v1 / Jina rerank request."""

    model_config = _strict(
        {
            "query": "What is the capital of France?",
            "documents": ["Paris is the capital of France.", "Berlin is in Germany."],
            "top_n": 1,
            "return_documents": True,
        }
    )

    documents: list[Document] = Field(
        min_length=1,
        description="Documents as strings or {text} objects (Cappy's responses); "
        "a document may be empty.",
    )
    top_n: TopN = None
    return_documents: bool = Field(
        False, strict=True, description="Include each document in its result; true or false."
    )


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="Cappy's raw score.")
    document: DocumentText | None = Field(None, description="With return_documents.")


class RerankUsage(BaseModel):
    total_tokens: int = Field(description="Tokens the scorer read.")


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult] = Field(description="Best first (ties: the lowest index).")
    usage: RerankUsage


class V2RerankRequest(_RerankRequest):
    """Cohere v2 rerank request (`cohere.ClientV2().rerank`)."""

    model_config = _strict(
        {
            "model": "rerank-v3.5",
            "query": "What is the capital of France?",
            "documents": ["Paris is the capital of France.", "Berlin is in Germany."],
            "top_n": 1,
        }
    )

    documents: list[str] = Field(
        min_length=1, description="Documents (Cappy's responses); a document may be empty."
    )
    top_n: TopN = None
    max_tokens_per_doc: PositiveInteger | None = Field(
        None,
        description="Cut each document to about this many tokens before scoring (default: "
        "no cut beyond the model's max length, where every pair is truncated anyway).",
    )


class V2RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="Cappy's raw score.")


class ApiVersion(BaseModel):
    version: str = Field(description="The Cohere API version this answer follows.")


class MetaTokens(BaseModel):
    input_tokens: int = Field(description="Tokens the scorer read.")


class V2RerankMeta(BaseModel):
    api_version: ApiVersion
    tokens: MetaTokens


class V2RerankResponse(BaseModel):
    """Cohere v2 rerank response."""

    id: str
    results: list[V2RerankResult] = Field(description="Best first (ties: the lowest index).")
    meta: V2RerankMeta
