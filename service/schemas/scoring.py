"""Wire models of the scoring routes: /score, /select, /v1/rerank."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.common import Usage


class Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instruction: str = Field(description="The instruction (prompt); scored first.")
    response: str = Field(description="The response to rate against the instruction.")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "pairs": [
                        {"instruction": "What is the capital of France?", "response": "Paris."},
                        {"instruction": "What is the capital of France?", "response": "Lyon."},
                    ]
                }
            ]
        },
    )

    pairs: list[Pair] = Field(min_length=1, description="(instruction, response) pairs to score.")
    model: str | None = Field(None, description="Ignored if it names the served scorer.")


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


class SelectRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "instruction": "Is this review positive or negative? 'Loved it.'",
                    "candidates": ["positive", "negative"],
                }
            ]
        },
    )

    instruction: str = Field(description="The instruction every candidate answers.")
    candidates: list[str] = Field(min_length=1, description="Candidate responses.")
    top_n: int | None = Field(
        None, ge=1, description="Length of the returned ranking (default: all candidates)."
    )
    model: str | None = Field(None, description="Ignored if it names the served scorer.")


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
    text: str = Field(description="The document's text.")


class RerankRequest(BaseModel):
    """Cohere v2 / Jina rerank request."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "query": "What is the capital of France?",
                    "documents": ["Paris is the capital of France.", "Berlin is in Germany."],
                    "top_n": 1,
                    "return_documents": True,
                }
            ]
        },
    )

    model: str | None = Field(None, description="Ignored if it names the served scorer.")
    query: str = Field(description="The query (Cappy's instruction).")
    documents: list[str | DocumentText] = Field(
        min_length=1, description="Documents as strings or {text} objects (Cappy's responses)."
    )
    top_n: int | None = Field(None, ge=1, description="How many results (default: all).")
    return_documents: bool = Field(False, description="Include each document in its result.")


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
