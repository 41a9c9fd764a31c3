"""`CAPPY_MODEL` naming a checkpoint or hub id: the app exports it in the background while
/health already answers and /ready says "exporting" (a first start can take minutes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.integration.conftest import running_app, wait_ready


async def test_checkpoint_is_exported_while_health_answers(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    async with running_app(tiny_checkpoint, ready=False, cache_dir=cache) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        exporting = await client.get("/ready")
        assert exporting.status_code == 503 and exporting.json()["status"] == "exporting"
        assert exporting.headers["Retry-After"]
        await wait_ready(client, timeout=240)
        served = await client.post("/select", json={"instruction": "q", "candidates": ["a", "b"]})
        assert served.status_code == 200
        info = (await client.get("/info")).json()
        assert info["model"] == tiny_checkpoint.name
    exports = list(cache.glob("[!.]*"))  # the export; its lock file is hidden
    assert len(exports) == 1 and (exports[0] / "cappy_export.json").is_file()


async def test_failed_export_turns_health_red(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an uncached hub id cannot be fetched
    async with running_app(
        "cappy-test/not-cached-anywhere", ready=False, cache_dir=tmp_path / "cache"
    ) as client:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 240
        while (health := await client.get("/health")).status_code == 200:
            assert loop.time() < deadline, "the failed export never showed in /health"
            assert (await client.get("/ready")).json()["status"] == "exporting"
            await asyncio.sleep(0.2)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert (await client.get("/ready")).json()["status"] == "unavailable"
        refused = await client.post("/select", json={"instruction": "q", "candidates": ["a"]})
        assert refused.status_code == 503
        assert "Traceback" not in refused.text
