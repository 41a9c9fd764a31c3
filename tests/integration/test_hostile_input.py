"""Hostile input on the scoring routes, through the app with its lifespan: text that is not
Unicode, coerced types, unknown fields, blank text, bodies too large to say so up front, and
callers without a key. Every refusal is a 4xx in the error envelope naming the field, and the
service goes on serving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from service import metrics
from service.app import create_app
from service.schemas.scoring import RerankResponse, SelectResponse
from service.settings import Settings
from tests.integration.conftest import running_app
from tests.integration.test_scoring_api import assert_error

JSON = {"content-type": "application/json"}


def rejected(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value("cappy_requests_rejected_total", {"reason": reason})
    return value or 0.0


# Bodies as a client's bytes: the escapes are JSON's, as curl sends them (an encoder of a Python
# str would refuse to produce them).
LONE_SURROGATES = [
    ("/select", rb'{"instruction": "x\ud800y", "candidates": ["a"]}', "instruction"),
    ("/select", rb'{"instruction": "q", "candidates": ["a", "b\udfff"]}', "candidates.1"),
    ("/select", rb'{"instruction": "q", "candidates": ["a"], "model": "\udc00"}', "model"),
    (
        "/score",
        rb'{"pairs": [{"instruction": "q", "response": "a"}, '
        rb'{"instruction": "q", "response": "\ud800"}]}',
        "pairs.1.response",
    ),
    ("/v1/rerank", rb'{"query": "\udbff", "documents": ["a"]}', "query"),
    ("/v1/rerank", rb'{"query": "q", "documents": ["a", "\ud800"]}', "documents.1"),
    ("/v1/rerank", rb'{"query": "q", "documents": [{"text": "\ud800"}]}', "documents.0.text"),
    ("/v2/rerank", rb'{"model": "m", "query": "q", "documents": ["\ud800z"]}', "documents.0"),
]


async def test_lone_surrogates_are_a_400_naming_the_field(tiny_export: Path) -> None:
    """`"x\\ud800y"` decodes to a str that is not Unicode; it used to reach the tokenizer and
    come back as a 500 (TypeError). Now: 400 with the field, and the service goes on."""
    before = rejected("invalid")
    async with running_app(tiny_export) as client:
        for path, body, param in LONE_SURROGATES:
            response = await client.post(path, content=body, headers=JSON)
            error = assert_error(response, 400, "lone_surrogate")
            assert error["param"] == param, (path, error)
            assert error["type"] == "invalid_request_error"
            assert param in error["message"] and "surrogate" in error["message"]
        # A valid surrogate pair is one code point (an emoji): scored as usual.
        emoji = await client.post(
            "/select",
            content=rb'{"instruction": "react \ud83d\ude00", "candidates": ["\ud83d\udc4d"]}',
            headers=JSON,
        )
        after = await client.post("/select", json={"instruction": "q", "candidates": ["a"]})
    assert emoji.status_code == 200, emoji.text
    assert SelectResponse.model_validate(emoji.json()).candidate == "\U0001f44d"
    assert after.status_code == 200
    assert rejected("invalid") == before + len(LONE_SURROGATES)


@pytest.mark.parametrize(
    ("path", "payload", "param"),
    [
        ("/select", {"instruction": "q", "candidates": ["a", "b"], "top_n": "2"}, "top_n"),
        ("/select", {"instruction": "q", "candidates": ["a", "b"], "top_n": 1.5}, "top_n"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": "2"}, "top_n"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": True}, "top_n"),
        (
            "/v1/rerank",
            {"query": "q", "documents": ["a"], "return_documents": "yes"},
            "return_documents",
        ),
        (
            "/v1/rerank",
            {"query": "q", "documents": ["a"], "return_documents": 0},
            "return_documents",
        ),
        (
            "/v1/rerank",
            {"query": "q", "documents": ["a"], "return_documents": "true"},
            "return_documents",
        ),
        ("/v2/rerank", {"model": "m", "query": "q", "documents": ["a"], "top_n": "1"}, "top_n"),
        (
            "/v2/rerank",
            {"model": "m", "query": "q", "documents": ["a"], "max_tokens_per_doc": "9"},
            "max_tokens_per_doc",
        ),
        # Unknown fields inside a document object are refused, like everywhere else.
        (
            "/v1/rerank",
            {"query": "q", "documents": [{"text": "a", "title": "t"}]},
            "documents.0.title",
        ),
        ("/v1/rerank", {"query": "q", "documents": [{"txt": "a"}]}, "documents.0"),
        (
            "/v2/rerank",
            {"model": "m", "query": "q", "documents": [{"text": "a"}]},
            "documents.0",
        ),
        (
            "/v2/rerank",
            {"model": "m", "query": "q", "documents": ["a"], "priority": 1},
            "priority",
        ),
    ],
)
async def test_no_coercion_and_no_unknown_fields(
    tiny_export: Path, path: str, payload: dict[str, Any], param: str
) -> None:
    async with running_app(tiny_export) as client:
        error = assert_error(await client.post(path, json=payload), 400)
    assert error["param"] is not None and error["param"].startswith(param), error
    assert error["type"] == "invalid_request_error"


async def test_blank_text_schema_and_service_agree(tiny_export: Path) -> None:
    """Instructions and queries must hold a non-blank character: the schema says so (a pattern
    the OpenAPI spec shows) and refuses "" and "  " alike with `empty_field`. Responses,
    candidates and documents may be empty: the schema allows it and the service scores them."""
    async with running_app(tiny_export) as client:
        spec = (await client.get("/openapi.json")).json()
        blanks = [
            await client.post("/select", json={"instruction": "", "candidates": ["a"]}),
            await client.post("/select", json={"instruction": " \t\n", "candidates": ["a"]}),
            await client.post("/score", json={"pairs": [{"instruction": " ", "response": "a"}]}),
            await client.post("/v1/rerank", json={"query": "  ", "documents": ["a"]}),
            await client.post("/v2/rerank", json={"model": "m", "query": "", "documents": ["a"]}),
        ]
        empty_answers = [
            await client.post("/select", json={"instruction": "q", "candidates": ["", " "]}),
            await client.post("/score", json={"pairs": [{"instruction": "q", "response": ""}]}),
            await client.post("/v1/rerank", json={"query": "q", "documents": ["", {"text": ""}]}),
            await client.post("/v2/rerank", json={"model": "m", "query": "q", "documents": [""]}),
        ]
    params = ["instruction", "instruction", "pairs.0.instruction", "query", "query"]
    for response, param in zip(blanks, params, strict=True):
        error = assert_error(response, 400, "empty_field")
        assert error["param"] == param
    assert [r.status_code for r in empty_answers] == [200] * 4, [r.text for r in empty_answers]
    schemas = spec["components"]["schemas"]
    for model, field in (
        ("SelectRequest", "instruction"),
        ("Pair", "instruction"),
        ("RerankRequest", "query"),
        ("V2RerankRequest", "query"),
    ):
        prop = schemas[model]["properties"][field]
        assert prop["pattern"] == r"\S" and "blank" in prop["description"], (model, prop)
    for model, field in (("SelectRequest", "candidates"), ("Pair", "response")):
        prop = schemas[model]["properties"][field]
        assert "pattern" not in str(prop) and "empty" in prop["description"], (model, prop)
    documents = schemas["RerankRequest"]["properties"]["documents"]["items"]
    assert {"type": "string"} in documents["anyOf"]  # strings or {text} objects, as sent


async def test_openapi_documents_info_auth_and_metrics_content_type(tiny_export: Path) -> None:
    app = create_app(Settings(model=str(tiny_export)))
    paths = app.openapi()["paths"]
    info = paths["/info"]["get"]["responses"]
    assert info["401"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    metrics_ok = paths["/metrics"]["get"]["responses"]["200"]
    assert list(metrics_ok["content"]) == [CONTENT_TYPE_LATEST.split(";")[0]]
    assert "application/json" not in metrics_ok["content"]
    assert "503" in paths["/ready"]["get"]["responses"]
    async with running_app(tiny_export) as client:
        served = await client.get("/metrics")
    assert served.headers["content-type"] == CONTENT_TYPE_LATEST


async def test_the_key_is_checked_before_the_body(tiny_export: Path) -> None:
    """A caller without a key learns nothing from how its body would be judged: garbage, a
    body over the limit, an unknown path are all 401 to it."""
    key = {"Authorization": "Bearer key-one"}
    async with running_app(tiny_export, api_keys="key-one", max_body_bytes=2048) as client:
        garbage = await client.post("/select", content=b"{not json", headers=JSON)
        huge = await client.post("/select", content=b"x" * 4096, headers=JSON)
        unknown = await client.get("/nope")
        v2 = await client.post("/v2/rerank", content=b"[]", headers=JSON)
        garbage_with_key = await client.post(
            "/select", content=b"{not json", headers={**JSON, **key}
        )
        huge_with_key = await client.post("/select", content=b"x" * 4096, headers={**JSON, **key})
        unknown_with_key = await client.get("/nope", headers=key)
        public = [await client.get(p) for p in ("/health", "/ready", "/metrics", "/openapi.json")]
        docs = await client.get("/docs")
    for response in (garbage, huge, unknown, v2):
        error = assert_error(response, 401, "invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
        assert error["type"] == "authentication_error"
    assert_error(garbage_with_key, 400)
    assert_error(huge_with_key, 413, "body_too_large")
    assert_error(unknown_with_key, 404)
    assert [r.status_code for r in public] == [200] * 4
    assert docs.status_code == 200


async def _chunks(total: int, size: int = 512) -> AsyncIterator[bytes]:
    body = b'{"instruction": "q", "candidates": ["' + b"a" * total + b'"]}'
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def test_chunked_body_over_the_limit_is_413(tiny_export: Path) -> None:
    """Without a Content-Length the body is counted as it arrives: over the limit it is a 413,
    not FastAPI's 400 for a body it could not read."""
    before = rejected("body_too_large")
    async with running_app(tiny_export, max_body_bytes=4096) as client:
        over = await client.post("/select", content=_chunks(8000), headers=JSON)
        under = await client.post("/select", content=_chunks(1000), headers=JSON)
        rerank = await client.post("/v1/rerank", json={"query": "q", "documents": ["a"]})
    assert "content-length" not in over.request.headers
    error = assert_error(over, 413, "body_too_large")
    assert "4096" in error["message"]
    assert under.status_code == 200, under.text
    RerankResponse.model_validate(rerank.json())
    assert rejected("body_too_large") == before + 1
