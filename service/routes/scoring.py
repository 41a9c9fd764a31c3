"""The scoring routes: /score (pairs -> scores), /select (best candidate), /v1/rerank (Cohere v1
/ Jina shape), /v2/rerank (Cohere v2 shape). Thin handlers: validate limits, score through the
batcher, shape the answer."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

from fastapi import APIRouter, Request, Response

from service.cancellation import ClientDisconnected, cancel_on_disconnect
from service.deps import ReadyRuntimeDep, SettingsDep
from service.engine.batcher import ScoredPair
from service.engine.runtime import ScoringRuntime
from service.errors import ApiError, client_closed
from service.model_source import display_name
from service.schemas.common import Usage, error_responses
from service.schemas.scoring import (
    ApiVersion,
    DocumentText,
    MetaTokens,
    PairScore,
    RankedCandidate,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreRequest,
    ScoreResponse,
    SelectRequest,
    SelectResponse,
    V2RerankMeta,
    V2RerankRequest,
    V2RerankResponse,
    V2RerankResult,
)
from service.settings import Settings

logger = logging.getLogger(__name__)
router = APIRouter(tags=["scoring"])
_ERRORS = error_responses(400, 401, 413, 429, 500, 503, 504)


def _check_count(count: int, param: str, settings: Settings) -> None:
    if count > settings.max_items_per_request:
        raise ApiError(
            400,
            f"{param}: {count} items, more than the limit of {settings.max_items_per_request}.",
            param=param,
            code="too_many_items",
        )


def _check_text(text: str, param: str, settings: Settings) -> None:
    if len(text) > settings.max_text_chars:
        raise ApiError(
            400,
            f"{param}: {len(text)} characters, more than the limit of {settings.max_text_chars}.",
            param=param,
            code="text_too_long",
        )


async def _score(
    request: Request,
    response: Response,
    settings: Settings,
    work: Callable[[float], Awaitable[list[ScoredPair]]],
) -> list[ScoredPair]:
    """Runs `work(deadline)` (scoring or ranking through the batcher), cancelled if the client
    disconnects, and sets the timing headers."""
    started = time.perf_counter()
    deadline = time.monotonic() + settings.request_timeout_s
    try:
        results = await cancel_on_disconnect(request, work(deadline))
    except ClientDisconnected:
        # Nobody reads this answer; 499 is what proxies log for a client that went away.
        logger.info("%s: client closed the request (499); its pairs were dropped", request.url.path)
        raise client_closed() from None
    response.headers["x-compute-time"] = f"{(time.perf_counter() - started) * 1000:.1f}"
    response.headers["x-pairs"] = str(len(results))
    return results


def _ranking(results: Sequence[ScoredPair]) -> list[int]:
    """Indices best first; ties go to the lower index."""
    return sorted(range(len(results)), key=lambda i: (-results[i].score, i))


def _usage(results: Sequence[ScoredPair]) -> Usage:
    tokens = sum(r.tokens for r in results)
    return Usage(prompt_tokens=tokens, total_tokens=tokens)


@router.post("/score", response_model=ScoreResponse, responses=_ERRORS)
async def score(
    body: ScoreRequest,
    request: Request,
    response: Response,
    runtime: ReadyRuntimeDep,
    settings: SettingsDep,
) -> ScoreResponse:
    """Scores each (instruction, response) pair; answers in the request's order."""
    _check_count(len(body.pairs), "pairs", settings)
    for i, pair in enumerate(body.pairs):
        _check_text(pair.instruction, f"pairs.{i}.instruction", settings)
        _check_text(pair.response, f"pairs.{i}.response", settings)
    pairs = [(p.instruction, p.response) for p in body.pairs]
    results = await _score(
        request, response, settings, lambda deadline: runtime.score(pairs, deadline=deadline)
    )
    return ScoreResponse(
        model=display_name(settings, runtime.export),
        data=[
            PairScore(index=i, score=r.score, truncated=r.truncated) for i, r in enumerate(results)
        ],
        usage=_usage(results),
    )


@router.post("/select", response_model=SelectResponse, responses=_ERRORS)
async def select(
    body: SelectRequest,
    request: Request,
    response: Response,
    runtime: ReadyRuntimeDep,
    settings: SettingsDep,
) -> SelectResponse:
    """Scores every candidate against the instruction and answers with the best one."""
    _check_text(body.instruction, "instruction", settings)
    _check_count(len(body.candidates), "candidates", settings)
    for i, candidate in enumerate(body.candidates):
        _check_text(candidate, f"candidates.{i}", settings)
    results = await _score(
        request,
        response,
        settings,
        lambda deadline: runtime.rank(body.instruction, body.candidates, deadline=deadline),
    )
    order = _ranking(results)
    best = order[0]
    top = order[: body.top_n] if body.top_n else order
    return SelectResponse(
        model=display_name(settings, runtime.export),
        index=best,
        candidate=body.candidates[best],
        score=results[best].score,
        ranking=[
            RankedCandidate(index=i, score=results[i].score, truncated=results[i].truncated)
            for i in top
        ],
        usage=_usage(results),
    )


async def _rerank(
    request: Request,
    response: Response,
    runtime: ScoringRuntime,
    settings: Settings,
    query: str,
    texts: list[str],
    max_tokens_per_doc: int | None = None,
) -> tuple[list[ScoredPair], list[int]]:
    """Scores the documents against the query: (results in request order, indices best first)."""
    _check_text(query, "query", settings)
    _check_count(len(texts), "documents", settings)
    for i, text in enumerate(texts):
        _check_text(text, f"documents.{i}", settings)

    async def work(deadline: float) -> list[ScoredPair]:
        documents = texts
        tokenizer = runtime.tokenizer
        if max_tokens_per_doc is not None and tokenizer is not None:
            documents = await asyncio.to_thread(tokenizer.truncate_texts, texts, max_tokens_per_doc)
        return await runtime.rank(query, documents, deadline=deadline)

    results = await _score(request, response, settings, work)
    return results, _ranking(results)


@router.post(
    "/v1/rerank", response_model=RerankResponse, response_model_exclude_none=True, responses=_ERRORS
)
async def rerank(
    body: RerankRequest,
    request: Request,
    response: Response,
    runtime: ReadyRuntimeDep,
    settings: SettingsDep,
) -> RerankResponse:
    """Cohere v1 / Jina rerank: documents by Cappy score against the query, best first."""
    texts = [d.text for d in body.documents]
    results, order = await _rerank(request, response, runtime, settings, body.query, texts)
    top = order[: body.top_n] if body.top_n else order
    return RerankResponse(
        id=str(uuid.uuid4()),
        model=display_name(settings, runtime.export),
        results=[
            RerankResult(
                index=i,
                relevance_score=results[i].score,
                document=DocumentText(text=texts[i]) if body.return_documents else None,
            )
            for i in top
        ],
        usage=RerankUsage(total_tokens=sum(r.tokens for r in results)),
    )


@router.post("/v2/rerank", response_model=V2RerankResponse, responses=_ERRORS)
async def rerank_v2(
    body: V2RerankRequest,
    request: Request,
    response: Response,
    runtime: ReadyRuntimeDep,
    settings: SettingsDep,
) -> V2RerankResponse:
    """Cohere v2 rerank (`cohere.ClientV2().rerank`): documents by Cappy score against the
    query, best first; `max_tokens_per_doc` cuts each document before scoring."""
    results, order = await _rerank(
        request,
        response,
        runtime,
        settings,
        body.query,
        body.documents,
        body.max_tokens_per_doc,
    )
    top = order[: body.top_n] if body.top_n else order
    return V2RerankResponse(
        id=str(uuid.uuid4()),
        results=[V2RerankResult(index=i, relevance_score=results[i].score) for i in top],
        meta=V2RerankMeta(
            api_version=ApiVersion(version="2"),
            tokens=MetaTokens(input_tokens=sum(r.tokens for r in results)),
        ),
    )
