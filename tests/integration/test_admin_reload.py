"""Hot reload: POST /admin/reload switches the served export under concurrent load without a
failed request, /info shows the new manifest, a bad directory is refused while the old model
keeps serving, and SIGHUP's path re-reads CAPPY_MODEL."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from service import metrics
from service.app import create_app, reload_from_settings
from service.settings import Settings
from tests.integration.conftest import running_app

KEY = {"Authorization": "Bearer admin-key"}


def tiny_export_source(export: Path) -> str:
    return json.loads((export / "cappy_export.json").read_text())["source"]["model"]


@pytest.fixture
def second_export(minilm_export: Path) -> Path:
    """Another model altogether: MiniLM (BERT, WordPiece, token type ids) after a tiny RoBERTa."""
    return minilm_export


async def select_loop(client: httpx.AsyncClient, stop: asyncio.Event, statuses: list[int]) -> None:
    body = {"instruction": "which is best?", "candidates": ["one", "two words", "three w o"]}
    while not stop.is_set():
        statuses.append((await client.post("/select", json=body, headers=KEY)).status_code)


async def until_answered(statuses: list[int], count: int) -> None:
    """Waits until the workers have `count` answers (counted, not timed)."""
    for _ in range(6000):
        if len(statuses) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(statuses)} answers, not {count}, within 60 s")


async def test_reload_under_load_fails_no_request(tiny_export: Path, second_export: Path) -> None:
    async with running_app(tiny_export, api_keys="admin-key") as client:
        before = (await client.get("/info", headers=KEY)).json()
        assert before["source"]["model"] == str(tiny_export_source(tiny_export))
        stop = asyncio.Event()
        statuses: list[int] = []
        workers = [asyncio.create_task(select_loop(client, stop, statuses)) for _ in range(4)]
        await until_answered(statuses, 10)  # before the reload
        answer = await client.post("/admin/reload", json={"model": str(second_export)}, headers=KEY)
        await until_answered(statuses, len(statuses) + 10)  # and after it
        stop.set()
        await asyncio.gather(*workers)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == str(second_export.resolve())
        assert answer.json()["previous"] == str(tiny_export.resolve())
        assert len(statuses) > 20 and set(statuses) == {200}  # nothing failed or was dropped
        after = (await client.get("/info", headers=KEY)).json()
        assert after["source"] != before["source"]  # the new manifest
        assert after["ready"] is True
        assert (await client.get("/ready")).status_code == 200


async def test_a_bad_directory_is_refused_and_the_old_model_keeps_serving(
    tiny_export: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_export, broken)
    (broken / "model.onnx").write_bytes(b"not a graph")
    async with running_app(tiny_export, api_keys="admin-key") as client:
        for model, reason in ((broken, "sha256 mismatch"), (tmp_path / "nowhere", "no such")):
            answer = await client.post("/admin/reload", json={"model": str(model)}, headers=KEY)
            assert answer.status_code == 400
            error = answer.json()["error"]
            assert reason in error["message"] and error["param"] == "model"
            assert "still serving" in error["message"]
        info = (await client.get("/info", headers=KEY)).json()
        assert info["source"]["model"] == str(tiny_export_source(tiny_export))
        body = {"instruction": "q", "candidates": ["a", "b"]}
        assert (await client.post("/select", json=body, headers=KEY)).status_code == 200
        # Unauthenticated: 401, before anything else.
        anonymous = await client.post("/admin/reload", json={"model": str(broken)})
        assert anonymous.status_code == 401


async def test_admin_routes_need_api_keys(tiny_export: Path) -> None:
    async with running_app(tiny_export) as client:
        answer = await client.post("/admin/reload", json={"model": "/anywhere"})
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "admin_disabled"


async def test_sighup_rereads_cappy_model(
    tiny_export: Path, second_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(Settings(model=str(tiny_export)))
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60):
        runtime = app.state.runtime
        for _ in range(1200):
            if runtime.ready:
                break
            await asyncio.sleep(0.05)
        assert runtime.ready
        monkeypatch.setenv("CAPPY_MODEL", str(second_export))
        await reload_from_settings(runtime)  # what the SIGHUP handler runs
        assert runtime.export.path == second_export.resolve()
        monkeypatch.setenv("CAPPY_MODEL", str(second_export / "missing"))
        await reload_from_settings(runtime)  # refused, logged: the model keeps serving
        assert runtime.export.path == second_export.resolve() and runtime.ready


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def reported_names(client: httpx.AsyncClient) -> list[str]:
    """The scorer's name as /select, /score, /v1/rerank, /v1/models and /info report it."""
    select = {"instruction": "q", "candidates": ["a", "b"]}
    score = {"pairs": [{"instruction": "q", "response": "a"}]}
    rerank = {"query": "q", "documents": ["a"]}
    return [
        (await client.post("/select", json=select, headers=KEY)).json()["model"],
        (await client.post("/score", json=score, headers=KEY)).json()["model"],
        (await client.post("/v1/rerank", json=rerank, headers=KEY)).json()["model"],
        (await client.get("/v1/models", headers=KEY)).json()["data"][-1]["id"],
        (await client.get("/info", headers=KEY)).json()["model"],
    ]


async def test_the_reported_name_follows_a_reload(tiny_export: Path, tmp_path: Path) -> None:
    """Every answer after a reload names the new export (it named the old one: the name was
    fixed at start); CAPPY_MODEL_NAME still wins. The reload is a route of its own in
    /metrics."""
    first, second = tmp_path / "cappy-first", tmp_path / "cappy-second"
    shutil.copytree(tiny_export, first)
    shutil.copytree(tiny_export, second)  # the same checkpoint: only the directory differs
    before = sample("cappy_request_duration_seconds_count", route="/admin/reload", status="200")
    async with running_app(first, api_keys="admin-key") as client:
        assert await reported_names(client) == ["cappy-first"] * 5
        answer = await client.post("/admin/reload", json={"model": str(second)}, headers=KEY)
        assert answer.status_code == 200, answer.text
        assert await reported_names(client) == ["cappy-second"] * 5
        exposition = (await client.get("/metrics")).text
    assert 'cappy_request_duration_seconds_count{route="/admin/reload",status="200"}' in exposition
    after = sample("cappy_request_duration_seconds_count", route="/admin/reload", status="200")
    assert after == before + 1
    async with running_app(first, api_keys="admin-key", model_name="house-scorer") as client:
        answer = await client.post("/admin/reload", json={"model": str(second)}, headers=KEY)
        assert answer.status_code == 200, answer.text
        assert await reported_names(client) == ["house-scorer"] * 5


# (path sent, what the refusal says)
BAD_PATHS = [
    ("/" + "0" * 4999, "at most 4096 characters"),  # 5,000 characters: refused as sent
    ("/tmp/" + "0" * 300, "too long"),  # fits the limit, not the file system (Errno 36)
    ("/exports/does-not-exist", "/exports/does-not-exist: no such export directory"),
    ("not/here/relative", "not/here/relative: no such export directory"),
]


async def test_a_bad_path_is_refused_in_the_products_words(tiny_export: Path) -> None:
    """What is wrong, naming the path as sent (cut short when long), never an exception class
    or another server path (it said `OSError: [Errno 36] File name too long: '/…/000…'`)."""
    async with running_app(tiny_export, api_keys="admin-key") as client:
        answers = [
            await client.post("/admin/reload", json={"model": model}, headers=KEY)
            for model, _ in BAD_PATHS
        ]
        info = (await client.get("/info", headers=KEY)).json()
    for answer, (_, says) in zip(answers, BAD_PATHS, strict=True):
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        message = error["message"]
        assert says in message and error["param"] == "model", message
        assert len(message) < 200 and "0" * 100 not in message  # a long path is not echoed
        for internal in ("Error", "Errno", "Exception", str(tiny_export), str(Path.cwd())):
            assert internal not in message, message
    assert info["ready"] is True and info["source"]["model"] == tiny_export_source(tiny_export)
