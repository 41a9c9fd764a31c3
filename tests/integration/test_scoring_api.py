"""/score, /select and /v1/rerank through the ASGI app with its lifespan, on the tiny export."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from service.schemas.common import ErrorResponse
from service.schemas.scoring import (
    RerankResponse,
    ScoreResponse,
    SelectResponse,
    V2RerankResponse,
)
from tests.integration.conftest import GatedScorer, loaded, running_app, wait_ready

EXACT = {"engine": "onnxruntime", "precision": "fp32"}  # the fp32 graph: equal to PyTorch
INSTRUCTION = "Which planet is known as the Red Planet?"
CANDIDATES = ["Mars", "Venus is the second planet.", "", "火星 (Mars) ✓", "Jupiter " * 30]


def torch_scores(checkpoint: Path, pairs: list[tuple[str, str]]) -> np.ndarray:
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    batch = tokenizer(
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        truncation="longest_first",
        max_length=512,
        padding=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        return model(**batch).logits[:, 0].numpy()


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> Any:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    ErrorResponse.model_validate(body)
    assert "Traceback" not in response.text
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


async def test_score_equals_pytorch_in_order(tiny_export: Path, tiny_checkpoint: Path) -> None:
    pairs = [(INSTRUCTION, c) for c in CANDIDATES] + [("Say it. " * 400, "a long reply " * 300)]
    async with running_app(tiny_export, **EXACT) as client:
        response = await client.post(
            "/score", json={"pairs": [{"instruction": i, "response": r} for i, r in pairs]}
        )
    assert response.status_code == 200, response.text
    body = ScoreResponse.model_validate(response.json())
    assert [d.index for d in body.data] == list(range(len(pairs)))
    expected = torch_scores(tiny_checkpoint, pairs)
    np.testing.assert_allclose([d.score for d in body.data], expected, atol=1e-4, rtol=0)
    assert [d.truncated for d in body.data] == [False] * len(CANDIDATES) + [True]
    assert body.usage.prompt_tokens > 512
    assert float(response.headers["x-compute-time"]) >= 0


async def test_select_and_rerank_rank_by_score(tiny_export: Path, tiny_checkpoint: Path) -> None:
    expected = torch_scores(tiny_checkpoint, [(INSTRUCTION, c) for c in CANDIDATES])
    order = sorted(range(len(CANDIDATES)), key=lambda i: (-expected[i], i))
    async with running_app(tiny_export, **EXACT) as client:
        selected = await client.post(
            "/select", json={"instruction": INSTRUCTION, "candidates": CANDIDATES, "top_n": 2}
        )
        documents: list[Any] = [c if i % 2 else {"text": c} for i, c in enumerate(CANDIDATES)]
        reranked = await client.post(
            "/v1/rerank",
            json={
                "query": INSTRUCTION,
                "documents": documents,
                "top_n": 3,
                "return_documents": True,
                "model": "rerank-english-v3.0",
            },
        )
        plain = await client.post("/v1/rerank", json={"query": INSTRUCTION, "documents": ["a"]})
    select = SelectResponse.model_validate(selected.json())
    assert select.index == order[0] and select.candidate == CANDIDATES[order[0]]
    assert [r.index for r in select.ranking] == order[:2]
    assert select.score == pytest.approx(float(expected[order[0]]), abs=1e-4)
    rerank = RerankResponse.model_validate(reranked.json())
    assert [r.index for r in rerank.results] == order[:3]
    assert [r.document.text for r in rerank.results if r.document] == [
        CANDIDATES[i] for i in order[:3]
    ]
    assert rerank.usage.total_tokens == select.usage.total_tokens
    assert "document" not in plain.json()["results"][0]


async def test_an_integral_top_n_is_an_integer(tiny_export: Path) -> None:
    """`top_n: 2.0` is an integer by JSON Schema, and Cohere's API takes it; 2.5 is not."""
    docs = CANDIDATES[:4]
    bodies = {
        "/select": {"instruction": INSTRUCTION, "candidates": docs},
        "/v1/rerank": {"query": INSTRUCTION, "documents": docs},
        "/v2/rerank": {"model": "rerank-v3.5", "query": INSTRUCTION, "documents": docs},
    }
    async with running_app(tiny_export) as client:
        whole = {
            path: await client.post(path, json=b | {"top_n": 2.0}) for path, b in bodies.items()
        }
        exact = {path: await client.post(path, json=b | {"top_n": 2}) for path, b in bodies.items()}
        half = {
            path: await client.post(path, json=b | {"top_n": 2.5}) for path, b in bodies.items()
        }
        cut = await client.post(
            "/v2/rerank", json=bodies["/v2/rerank"] | {"max_tokens_per_doc": 8.0}
        )
    select = SelectResponse.model_validate(whole["/select"].json())
    assert select.ranking == SelectResponse.model_validate(exact["/select"].json()).ranking
    assert len(select.ranking) == 2
    assert RerankResponse.model_validate(whole["/v1/rerank"].json()).results == (
        RerankResponse.model_validate(exact["/v1/rerank"].json()).results
    )
    v2 = V2RerankResponse.model_validate(whole["/v2/rerank"].json())
    assert v2.results == V2RerankResponse.model_validate(exact["/v2/rerank"].json()).results
    assert len(v2.results) == 2
    assert cut.status_code == 200, cut.text
    for path, answer in half.items():
        assert assert_error(answer, 400)["param"] == "top_n", path


async def test_ties_go_to_the_lower_index(tiny_export: Path) -> None:
    async with running_app(tiny_export, **EXACT) as client:
        response = await client.post(
            "/select", json={"instruction": INSTRUCTION, "candidates": ["Mars", "Mars", "Mars"]}
        )
    body = SelectResponse.model_validate(response.json())
    assert body.index == 0
    assert [r.index for r in body.ranking] == [0, 1, 2]


@pytest.mark.parametrize(
    ("path", "payload", "param"),
    [
        ("/score", {"pairs": []}, "pairs"),
        ("/score", {}, "pairs"),
        ("/score", {"pairs": [{"instruction": "a", "response": 5}]}, "pairs.0.response"),
        ("/score", {"pairs": [{"instruction": " ", "response": "b"}]}, "pairs.0.instruction"),
        ("/score", {"pairs": [{"instruction": "a"}]}, "pairs.0.response"),
        ("/select", {"instruction": "", "candidates": ["a"]}, "instruction"),
        ("/select", {"instruction": "q", "candidates": []}, "candidates"),
        ("/select", {"instruction": "q", "candidates": "a"}, "candidates"),
        ("/select", {"instruction": "q", "candidates": ["a"], "top_n": 0}, "top_n"),
        ("/select", {"instruction": "q", "candidates": ["a"], "extra": 1}, "extra"),
        ("/v1/rerank", {"query": "q", "documents": [{"txt": "a"}]}, "documents.0"),
        ("/select", {"instruction": "q", "candidates": ["a"] * 9}, "candidates"),
        ("/select", {"instruction": "q", "candidates": ["x" * 201]}, "candidates.0"),
        ("/v1/rerank", {"query": "q" * 201, "documents": ["a"]}, "query"),
    ],
)
async def test_bad_input_is_a_clear_400(
    tiny_export: Path, path: str, payload: dict[str, Any], param: str
) -> None:
    async with running_app(tiny_export, max_items_per_request=8, max_text_chars=200) as client:
        error = assert_error(await client.post(path, json=payload), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param)
    assert error["message"]


async def test_malformed_bodies(tiny_export: Path) -> None:
    headers = {"content-type": "application/json"}
    async with running_app(tiny_export, max_body_bytes=4096) as client:
        bad_json = await client.post("/score", content=b'{"pairs": [', headers=headers)
        bad_utf8 = await client.post(
            "/score",
            content=b'{"pairs":[{"instruction":"\xff\xfe","response":"x"}]}',
            headers=headers,
        )
        too_big = await client.post(
            "/select", json={"instruction": "q", "candidates": ["word " * 1000]}
        )
        not_found = await client.get("/nope")
    assert_error(bad_json, 400)
    assert_error(bad_utf8, 400)
    assert_error(too_big, 413, "body_too_large")
    assert_error(not_found, 404)


async def test_api_keys(tiny_export: Path) -> None:
    payload = {"instruction": "q", "candidates": ["a", "b"]}
    async with running_app(tiny_export, api_keys="key-one,key-two") as client:
        missing = await client.post("/select", json=payload)
        wrong = await client.post("/select", json=payload, headers={"Authorization": "Bearer nope"})
        basic = await client.post(
            "/select", json=payload, headers={"Authorization": "Basic key-one"}
        )
        good = await client.post(
            "/select", json=payload, headers={"Authorization": "Bearer key-two"}
        )
        info = await client.get("/info")
        open_routes = [await client.get(p) for p in ("/health", "/ready", "/metrics")]
    for response in (missing, wrong, basic, info):
        error = assert_error(response, 401, "invalid_api_key")
        assert "key-one" not in response.text and "key-two" not in response.text
        assert error["type"] == "authentication_error"
    assert good.status_code == 200
    assert [r.status_code for r in open_routes] == [200, 200, 200]


async def test_no_auth_when_no_keys(tiny_export: Path) -> None:
    async with running_app(tiny_export) as client:
        response = await client.post("/select", json={"instruction": "q", "candidates": ["a"]})
        info = (await client.get("/info")).json()
    assert response.status_code == 200
    assert info["max_length"] == 512 and info["ready"] is True
    assert info["parity"]["fp32"]["status"] == "passed"
    assert info["limits"]["max_items_per_request"] == 1024


async def test_not_ready_until_warm(tiny_export: Path, gated: list[GatedScorer]) -> None:
    async with running_app(tiny_export, ready=False) as client:
        await asyncio.sleep(0.3)
        not_ready = await client.get("/ready")
        assert not_ready.status_code == 503 and not_ready.json()["status"] == "loading"
        assert (await client.get("/health")).status_code == 200
        refused = await client.post("/select", json={"instruction": "q", "candidates": ["a"]})
        assert_error(refused, 503, "not_ready")
        assert refused.headers["Retry-After"]
        (await loaded(gated)).warm_gate.set()
        await wait_ready(client, timeout=30)
        served = await client.post("/select", json={"instruction": "q", "candidates": ["a"]})
        assert served.status_code == 200


async def test_overload_is_429_with_retry_after(
    tiny_export: Path, gated: list[GatedScorer]
) -> None:
    gated_run = {"max_queue_tokens": 600, "max_batch_tokens": 64, "max_batch_size": 1}
    # ~525 tokens with the tiny BPE: two do not fit in 600. Distinct: ranking dedupes repeats.
    candidates = [f"{i} " + "word " * 20 for i in range(5)]
    async with running_app(tiny_export, ready=False, **gated_run) as client:
        scorer = await loaded(gated)
        scorer.warm_gate.set()
        await wait_ready(client)
        scorer.run_gate.clear()
        scorer.entered.clear()
        first = asyncio.create_task(
            client.post("/select", json={"instruction": "q", "candidates": candidates})
        )
        # admitted: its first batch waits at the model, the rest of it in the queue
        assert await asyncio.to_thread(scorer.entered.wait, 30)
        refused = await client.post("/select", json={"instruction": "q", "candidates": candidates})
        scorer.run_gate.set()
        accepted = await first
    error = assert_error(refused, 429, "overloaded")
    assert error["type"] == "rate_limit_error"
    assert int(refused.headers["Retry-After"]) >= 1
    assert accepted.status_code == 200


async def test_internal_error_leaks_nothing(tiny_export: Path, gated: list[GatedScorer]) -> None:
    async with running_app(tiny_export, ready=False) as client:
        (await loaded(gated)).warm_gate.set()
        await wait_ready(client)
        gated[0].fail_with = RuntimeError("secret at /home/ops/token=abc123")
        failed = await client.post("/select", json={"instruction": "q", "candidates": ["a"]})
        gated[0].fail_with = None
        after = await client.post("/select", json={"instruction": "q", "candidates": ["a"]})
    assert_error(failed, 500)
    assert "secret" not in failed.text and "abc123" not in failed.text
    assert after.status_code == 200


async def test_metrics_are_exposed(tiny_export: Path) -> None:
    async with running_app(tiny_export) as client:
        await client.post("/select", json={"instruction": "q", "candidates": ["a", "b"]})
        text = (await client.get("/metrics")).text
    for name in (
        'cappy_request_duration_seconds_bucket{le="0.001",route="/select",status="200"}',
        "cappy_queue_time_seconds_bucket",
        "cappy_inference_time_seconds_bucket",
        "cappy_batch_size_bucket",
        "cappy_batch_tokens_bucket",
        "cappy_batch_padding_fraction_bucket",
        "cappy_queue_pairs",
        "cappy_pairs_scored_total",
    ):
        assert name in text, name
