"""The request-duration metric's `route` label: every route the app has is its own label, any
other path is "other" (bounded cardinality)."""

from __future__ import annotations

import uuid

import httpx

from service import metrics
from service.app import create_app
from service.settings import Settings


def duration_count(route: str, status: str) -> float:
    labels = {"route": route, "status": status}
    return metrics.REGISTRY.get_sample_value("cappy_request_duration_seconds_count", labels) or 0.0


async def test_every_route_of_the_app_is_its_own_label() -> None:
    # No lifespan: nothing loads, every route answers from its checks (403, 503, 404...).
    app = create_app(Settings(model="org/scorer"))
    stray = f"/no-such-route-{uuid.uuid4().hex}"
    before = (duration_count("/admin/reload", "403"), duration_count("other", "404"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cappy") as client:
        reload = await client.post("/admin/reload", json={"model": "/exports/next"})
        missing = await client.get(stray)
        text = (await client.get("/metrics")).text
    assert (reload.status_code, missing.status_code) == (403, 404)
    assert duration_count("/admin/reload", "403") == before[0] + 1
    assert duration_count("other", "404") == before[1] + 1
    assert stray not in text
    # Only paths the app routes are labels, whatever clients sent.
    routes = set(app.openapi()["paths"]) | {"/docs", "/redoc", "/openapi.json"}
    labels = {
        sample.labels["route"]
        for family in metrics.REGISTRY.collect()
        if family.name == "cappy_request_duration_seconds"
        for sample in family.samples
    }
    assert labels <= routes | {"other"}


async def test_a_route_refused_before_routing_keeps_its_label() -> None:
    """The API-key check answers before the router runs: the label is still the route's."""
    app = create_app(Settings(model="org/scorer", api_keys="k"))
    before = duration_count("/admin/reload", "401")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cappy") as client:
        assert (await client.post("/admin/reload", json={})).status_code == 401
    assert duration_count("/admin/reload", "401") == before + 1
