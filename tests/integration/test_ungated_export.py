"""An export made with `cappy export --parity record` (a benchmark stand-in, nothing gated): the
service refuses it unless CAPPY_ALLOW_UNGATED is set, and then says plainly in /info that what it
serves was not gated."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from model_export.pipeline import ExportOptions, export
from tests.integration.conftest import running_app


@pytest.fixture(scope="module")
def recorded_export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("recorded") / "tiny"
    export(ExportOptions(model=str(tiny_checkpoint), out=out, parity="record", progress=False))
    return out


async def test_an_ungated_export_is_refused_by_default(
    recorded_export: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_app(recorded_export, ready=False) as client:
        for _ in range(1200):
            health = await client.get("/health")
            if health.status_code == 503:
                break
            await asyncio.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert (await client.get("/ready")).status_code == 503
    assert "CAPPY_ALLOW_UNGATED" in caplog.text  # the log says how to opt in


async def test_an_allowed_ungated_export_is_served_and_says_so(recorded_export: Path) -> None:
    async with running_app(recorded_export, allow_ungated=True) as client:
        info = (await client.get("/info")).json()
        assert info["parity_gated"] is False
        assert info["parity"]["mode"] == "record"
        answer = await client.post("/select", json={"instruction": "q", "candidates": ["a", "b"]})
        assert answer.status_code == 200 and answer.json()["index"] in (0, 1)
