"""The closed-loop HTTP client: `concurrency` workers on one httpx.AsyncClient, each sending its
next POST /select as soon as its previous one is answered; the client-side figures, argmax
agreement with a reference, and the server's own figures from /metrics and /info."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from loadtests.prometheus import Sample, metrics_diff, parse_metrics
from loadtests.stats import percentile, round_or_none
from loadtests.workload import schedule, select_body


@dataclass
class Outcome:
    """One request: its workload id, status (0 for a transport error), latency and answer."""

    id: Any
    pairs: int
    status: int
    latency_s: float
    index: int | None = None
    error: str | None = None


@dataclass
class RunResult:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0


def check_loopback(url: str) -> None:
    """Refuses any target that is not on this machine's loopback range."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"error: {url}: only loopback targets (127.0.0.0/8, ::1, localhost)")


async def _send(client: httpx.AsyncClient, item: dict[str, Any]) -> Outcome:
    pairs = len(item["candidates"])
    started = time.perf_counter()
    try:
        response = await client.post("/select", json=select_body(item))
    except httpx.HTTPError as exc:
        return Outcome(
            item["id"], pairs, 0, time.perf_counter() - started, error=type(exc).__name__
        )
    latency = time.perf_counter() - started
    index = None
    if response.status_code == 200:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            index = int(response.json()["index"])
    return Outcome(item["id"], pairs, response.status_code, latency, index=index)


async def drive(
    client: httpx.AsyncClient,
    items: Iterable[dict[str, Any]],
    concurrency: int,
    duration_s: float | None = None,
) -> RunResult:
    """Closed loop: `concurrency` workers send the next item as soon as their last one is
    answered, until the items run out or `duration_s` has passed (requests in flight then are
    finished and counted)."""
    iterator = iter(items)
    result = RunResult()
    started = time.perf_counter()
    stop_at = None if duration_s is None else started + duration_s

    async def worker() -> None:
        while stop_at is None or time.perf_counter() < stop_at:
            item = next(iterator, None)
            if item is None:
                return
            result.outcomes.append(await _send(client, item))

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    result.seconds = time.perf_counter() - started
    return result


def summarize(result: RunResult, reference: dict[str, int] | None = None) -> dict[str, Any]:
    """Client-side figures of a run."""
    ok = [o for o in result.outcomes if o.status == 200]
    latencies_ms = [o.latency_s * 1000 for o in ok]
    errors = Counter(
        str(o.status if o.status else o.error) for o in result.outcomes if o.status != 200
    )
    pairs = sum(o.pairs for o in ok)
    seconds = result.seconds
    figures: dict[str, Any] = {
        "requests": len(ok),
        "pairs": pairs,
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(ok) / seconds, 2) if seconds > 0 else None,
        "pairs_per_s": round(pairs / seconds, 1) if seconds > 0 else None,
        "latency_ms": {
            "p50": round_or_none(percentile(latencies_ms, 50), 1),
            "p95": round_or_none(percentile(latencies_ms, 95), 1),
            "p99": round_or_none(percentile(latencies_ms, 99), 1),
            "max": round_or_none(max(latencies_ms) if latencies_ms else None, 1),
            "mean": round_or_none(
                sum(latencies_ms) / len(latencies_ms) if latencies_ms else None, 1
            ),
        },
        "errors": dict(sorted(errors.items())),
    }
    if reference is not None:
        figures["argmax"] = argmax_agreement(ok, reference)
    return figures


def argmax_agreement(outcomes: Iterable[Outcome], reference: dict[str, int]) -> dict[str, Any]:
    """Share of answered requests whose returned best index equals the reference's; requests
    with one candidate agree trivially and are counted apart."""
    compared = agree = trivial = missing = 0
    disagreed: list[Any] = []
    for outcome in outcomes:
        expected = reference.get(str(outcome.id))
        if expected is None or outcome.index is None:
            missing += 1
            continue
        if outcome.pairs == 1:
            trivial += 1
            continue
        compared += 1
        if outcome.index == expected:
            agree += 1
        elif str(outcome.id) not in {str(d) for d in disagreed}:
            disagreed.append(outcome.id)
    return {
        "agreement": round(agree / compared, 5) if compared else None,
        "compared": compared,
        "single_candidate": trivial,
        "not_in_reference": missing,
        "disagreeing_ids": disagreed[:20],
    }


def load_reference(path: str | Path) -> dict[str, int]:
    """{id: index} from a JSONL of {"id", "index", ...}."""
    reference: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                reference[str(row["id"])] = int(row["index"])
    return reference


async def scrape(client: httpx.AsyncClient) -> dict[Sample, float] | None:
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    return parse_metrics(response.text) if response.status_code == 200 else None


async def server_info(client: httpx.AsyncClient) -> dict[str, Any] | None:
    """The served engine and batcher limits, from /info (None when it is not readable)."""
    try:
        response = await client.get("/info")
        if response.status_code != 200:
            return None
        info = response.json()
    except (httpx.HTTPError, ValueError):
        return None
    return {
        "model": info.get("model"),
        "runtime": info.get("runtime"),
        "limits": info.get("limits"),
    }


async def benchmark(
    url: str,
    workload: Sequence[dict[str, Any]],
    *,
    concurrency: int,
    limit: int | None = None,
    duration_s: float | None = None,
    warmup: int = 0,
    api_key: str | None = None,
    reference: dict[str, int] | None = None,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Warms up, scrapes /metrics, runs the timed phase, scrapes again; returns the figures."""
    check_loopback(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(
        max_connections=concurrency + 2,
        max_keepalive_connections=concurrency + 2,
        keepalive_expiry=60.0,
    )
    timeout = httpx.Timeout(timeout_s, connect=10.0)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        if warmup > 0:
            # From the end of the workload, so that the timed phase does not start with the same
            # requests (nothing is cached server-side, but the client should not assume it).
            await drive(client, schedule(workload[::-1], warmup, cycle=True), concurrency)
        info = await server_info(client)
        load_before = os.getloadavg()[0]
        before = await scrape(client)
        client_cpu = time.process_time()
        run = await drive(
            client,
            schedule(workload, limit, cycle=duration_s is not None or limit is not None),
            concurrency,
            duration_s,
        )
        client_cpu = time.process_time() - client_cpu
        after = await scrape(client)
        load_after = os.getloadavg()[0]
    figures: dict[str, Any] = {"concurrency": concurrency, **summarize(run, reference)}
    figures["server"] = (
        metrics_diff(before, after)
        if before is not None and after is not None
        else {"error": "/metrics not readable"}
    )
    if info is not None:
        figures["server_info"] = info
    # This process's own CPU during the timed phase: on a small machine the load generator
    # competes with the server for the same cores.
    figures["client_cpu_s"] = round(client_cpu, 2)
    figures["warmup"] = warmup
    figures["loadavg_1m"] = {"before": round(load_before, 2), "after": round(load_after, 2)}
    return figures
