"""The unmodified Cohere SDK against the app: the v1 client on /v1/rerank and ClientV2 on
/v2/rerank, through httpx's ASGI transport with the lifespan running."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import cohere
import httpx
import pytest
from asgi_lifespan import LifespanManager
from tokenizers import Tokenizer

from service.app import create_app
from service.settings import Settings
from tests.integration.conftest import wait_ready

QUERY = "Which planet is known as the Red Planet?"
DOCUMENTS = [
    "Venus is the second planet.",
    "Mars is the Red Planet.",
    "",
    "Jupiter is the largest planet, " * 12,
]


@pytest.fixture
async def http(tiny_export: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        model=str(tiny_export), engine="onnxruntime", precision="fp32", api_keys="co-key"
    )
    async with LifespanManager(create_app(settings), startup_timeout=120) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://cappy",
            headers={"Authorization": "Bearer co-key"},
            timeout=60,
        ) as client:
            await wait_ready(client)
            yield client


async def expected_order(http: httpx.AsyncClient, documents: list[str]) -> list[int]:
    ranked = await http.post("/select", json={"instruction": QUERY, "candidates": documents})
    return [r["index"] for r in ranked.json()["ranking"]]


async def test_cohere_v1_client(http: httpx.AsyncClient) -> None:
    co = cohere.AsyncClient(api_key="co-key", base_url="http://cappy", httpx_client=http)
    answer = await co.rerank(
        model="rerank-english-v3.0",
        query=QUERY,
        documents=DOCUMENTS,
        top_n=3,
        return_documents=True,
    )
    order = await expected_order(http, DOCUMENTS)
    assert [r.index for r in answer.results] == order[:3]
    assert [r.document.text for r in answer.results if r.document] == [
        DOCUMENTS[i] for i in order[:3]
    ]
    scores = [r.relevance_score for r in answer.results]
    assert scores == sorted(scores, reverse=True)
    assert answer.id


async def test_cohere_v2_client(http: httpx.AsyncClient) -> None:
    co = cohere.AsyncClientV2(api_key="co-key", base_url="http://cappy", httpx_client=http)
    answer = await co.rerank(model="rerank-v3.5", query=QUERY, documents=DOCUMENTS, top_n=2)
    order = await expected_order(http, DOCUMENTS)
    assert [r.index for r in answer.results] == order[:2]
    assert answer.id and answer.meta is not None
    assert answer.meta.api_version is not None and answer.meta.api_version.version == "2"
    assert answer.meta.tokens is not None and (answer.meta.tokens.input_tokens or 0) > 0
    full = await co.rerank(model="rerank-v3.5", query=QUERY, documents=DOCUMENTS)
    assert [r.index for r in full.results] == order
    # A wrong key is refused through the SDK's own error type.
    denied = cohere.AsyncClientV2(api_key="nope", base_url="http://cappy", httpx_client=http)
    with pytest.raises(cohere.errors.UnauthorizedError):
        await denied.rerank(model="m", query=QUERY, documents=["a"])


async def test_cohere_v2_max_tokens_per_doc(http: httpx.AsyncClient, tiny_export: Path) -> None:
    """Each document is cut to its first `max_tokens_per_doc` tokens before it is scored: the
    scores are those of the cut texts."""
    co = cohere.AsyncClientV2(api_key="co-key", base_url="http://cappy", httpx_client=http)
    limit = 4
    answer = await co.rerank(
        model="rerank-v3.5", query=QUERY, documents=DOCUMENTS, max_tokens_per_doc=limit
    )
    tokenizer = Tokenizer.from_file(str(tiny_export / "tokenizer.json"))
    tokenizer.no_truncation()
    cut = []
    for text in DOCUMENTS:
        encoding = tokenizer.encode(text, add_special_tokens=False)
        cut.append(text if len(encoding.ids) <= limit else text[: encoding.offsets[limit - 1][1]])
    assert cut[3] != DOCUMENTS[3] and cut[2] == ""
    scored = await http.post(
        "/score", json={"pairs": [{"instruction": QUERY, "response": t} for t in cut]}
    )
    expected = [d["score"] for d in scored.json()["data"]]
    by_index = {r.index: r.relevance_score for r in answer.results}
    assert [by_index[i] for i in range(len(DOCUMENTS))] == pytest.approx(expected, abs=1e-5)
