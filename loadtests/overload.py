"""Overload scenario against a running `cappy serve`: capacity, then an open-loop flood at a
multiple of it, then normal load; ONE JSON object of what the client and the server saw.

    python -m loadtests.overload --url http://127.0.0.1:8000 \\
        --requests ../shared/data/bench_requests.jsonl --out overload.json
    python -m loadtests.overload --self-contained --export /tmp/ex/minilm ...

Phases:
1. **baseline**: one request at a time (`--baseline-seconds`): the unloaded latency.
2. **capacity**: closed loop at `--capacity-concurrency` (`--capacity-seconds`): requests/s and
   pairs/s the server sustains (a refused worker waits its Retry-After, as a client should).
3. **overload**: open loop, Poisson arrivals at `--factor` x capacity for `--overload-seconds`,
   requests drawn from the workload in order (its mix of 1, 4, 17 and 64 candidates).
4. **recovery**: open loop at `--recovery-load` x capacity for `--recovery-seconds`.

Reported: per phase the answers by status, 429s with and without `Retry-After`, latency
percentiles, the share of requests answered 200 by candidate count (does any size starve?); for
the overload and recovery phases a per-second timeline (sent, 200s, 429s, p50 latency, the
server's RSS, queue depth and expected queue wait from /metrics); and `recovery_s`: seconds
from the end of the flood until the first second from which every request sent was answered
200 within `--recovered-latency-factor` x the baseline p95 (at least 0.5 s).

Beside the flood, a **retry probe** sends a single-candidate request (the workload's, in turn)
every `--probe-interval` seconds; each one refused 429 is retried every `--probe-poll` seconds
until admitted, so that
each Retry-After can be set against the time a retry was in fact admitted (`retry_probe`: the
pairs, and the share within 2x, counting a wait under 1 s as 1 s, the header's resolution). From
the server's `/metrics` around the flood: the queue time of the pairs it admitted (p50, p99, and
the share over its `max_queue_wait_s`, from /info). Open-loop requests are capped
at `--max-in-flight` on the client; arrivals beyond it are counted as `client_skipped`. Targets
other than loopback are refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtests.closed_loop import check_loopback
from loadtests.local_server import running_server
from loadtests.prometheus import parse_metrics, queue_time
from loadtests.stats import percentile
from loadtests.workload import DEFAULT_REQUESTS, load_workload, select_body


@dataclass(frozen=True, slots=True)
class Answer:
    sent_at: float  # seconds since the phase began
    candidates: int
    status: int  # 0: a transport error
    latency: float
    retry_after: str | None


async def send(client: httpx.AsyncClient, item: dict[str, Any], start: float) -> Answer:
    sent = time.perf_counter()
    try:
        response = await client.post("/select", json=select_body(item))
        status, retry_after = response.status_code, response.headers.get("retry-after")
    except httpx.HTTPError:
        status, retry_after = 0, None
    return Answer(
        sent - start, len(item["candidates"]), status, time.perf_counter() - sent, retry_after
    )


async def closed_loop(
    client: httpx.AsyncClient, workload: Sequence[dict[str, Any]], concurrency: int, seconds: float
) -> tuple[list[Answer], float]:
    start = time.perf_counter()
    answers: list[Answer] = []
    cursor = 0

    async def worker() -> None:
        nonlocal cursor
        while time.perf_counter() - start < seconds:
            item = workload[cursor % len(workload)]
            cursor += 1
            answer = await send(client, item, start)
            answers.append(answer)
            if answer.status == 429:  # as a well-behaved client does
                await asyncio.sleep(float(answer.retry_after or 1.0))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers, time.perf_counter() - start


async def open_loop(
    client: httpx.AsyncClient,
    workload: Sequence[dict[str, Any]],
    rate: float,
    seconds: float,
    max_in_flight: int,
    rng: random.Random,
    sampler: Sampler,
) -> tuple[list[Answer], int]:
    """Poisson arrivals at `rate` per second for `seconds`; waits for the answers."""
    start = time.perf_counter()
    tasks: set[asyncio.Task[Answer]] = set()
    done: list[Answer] = []
    skipped = 0
    cursor = 0
    sampler.start(start)
    next_at = 0.0
    while next_at < seconds:
        delay = start + next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_in_flight:
            skipped += 1
        else:
            task = asyncio.create_task(send(client, workload[cursor % len(workload)], start))
            cursor += 1
            tasks.add(task)
            task.add_done_callback(lambda t: (tasks.discard(t), done.append(t.result())))
        next_at += rng.expovariate(rate)
    while tasks:
        await asyncio.wait(set(tasks))
    await sampler.stop()
    return done, skipped


@dataclass(frozen=True, slots=True)
class Retry:
    """One probe refused 429: the Retry-After it was given and the seconds until a retry of it
    was admitted (None: never, within the probe's patience)."""

    sent_at: float
    retry_after_s: float
    admitted_after_s: float | None
    latency_s: float | None  # of the admitted retry


class RetryProbe:
    """A client beside the flood: one small request every `interval` seconds (the `items` in
    turn: distinct requests, as a real client's are; a retry sends its request again), each
    refusal retried every `poll` seconds (up to `patience`) to find when a retry is in fact
    admitted."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        items: Sequence[dict[str, Any]],
        interval: float,
        poll: float,
        patience: float = 120.0,
    ) -> None:
        self._client, self._items = client, list(items)
        self._interval, self._poll, self._patience = interval, poll, patience
        self._chains: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self.first: list[Answer] = []
        self.retries: list[Retry] = []

    def start(self, start: float, seconds: float) -> None:
        self._task = asyncio.create_task(self._run(start, seconds))

    async def wait(self) -> None:
        if self._task is not None:
            await self._task
        while self._chains:
            await asyncio.wait(set(self._chains))

    async def _run(self, start: float, seconds: float) -> None:
        sent = 0
        while time.perf_counter() - start < seconds:
            item = self._items[sent % len(self._items)]
            sent += 1
            chain = asyncio.create_task(self._chain(start, item))
            self._chains.add(chain)
            chain.add_done_callback(self._chains.discard)
            await asyncio.sleep(self._interval)

    async def _chain(self, start: float, item: dict[str, Any]) -> None:
        answer = await send(self._client, item, start)
        self.first.append(answer)
        if answer.status != 429 or not answer.retry_after:
            return
        refused_at = start + answer.sent_at + answer.latency
        while time.perf_counter() - refused_at < self._patience:
            await asyncio.sleep(self._poll)
            again = await send(self._client, item, start)
            if again.status != 429:
                admitted = start + again.sent_at - refused_at
                latency = again.latency if again.status == 200 else None
                self.retries.append(
                    Retry(answer.sent_at, float(answer.retry_after), admitted, latency)
                )
                return
        self.retries.append(Retry(answer.sent_at, float(answer.retry_after), None, None))


def retry_summary(probe: RetryProbe) -> dict[str, Any]:
    """How the probe's Retry-After values compare with when its retries were admitted."""
    pairs = [(r.retry_after_s, r.admitted_after_s) for r in probe.retries]
    judged = [(hint, max(1.0, actual)) for hint, actual in pairs if actual is not None]
    within = sum(1 for hint, actual in judged if actual / 2 <= hint <= 2 * actual)
    ok = [a.latency * 1000 for a in probe.first if a.status == 200]
    return {
        "sent": len(probe.first),
        "statuses": dict(sorted(Counter(str(a.status) for a in probe.first).items())),
        "first_try_latency_ms": {
            f"p{q}": None if (v := percentile(ok, q)) is None else round(v, 1) for q in (50, 99)
        },
        "refused": len(pairs),
        "never_admitted": sum(1 for _, actual in pairs if actual is None),
        "within_2x_share": round(within / len(judged), 3) if judged else None,
        "retry_after_vs_admitted_s": [
            [hint, None if actual is None else round(actual, 2)] for hint, actual in pairs
        ][:60],
    }


class Sampler:
    """Samples the server's RSS, queue depth and expected wait from /metrics once a second."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client
        self._task: asyncio.Task[None] | None = None
        self.samples: list[dict[str, float | None]] = []

    def start(self, start: float) -> None:
        self.samples = []
        self._task = asyncio.create_task(self._run(start))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, start: float) -> None:
        while True:
            self.samples.append(
                {"t": round(time.perf_counter() - start, 2), **await scrape(self._client)}
            )
            await asyncio.sleep(1.0)


async def scrape(client: httpx.AsyncClient) -> dict[str, float | None]:
    """The server's RSS, queue depth and expected wait (None each when /metrics can't be read)."""
    samples = await scrape_all(client)

    def value(name: str) -> float | None:
        found = [v for (n, _), v in samples.items() if n == name]
        return found[0] if found else None

    rss = value("process_resident_memory_bytes")
    return {
        "rss_mb": None if rss is None else round(rss / 2**20, 1),
        "queue_pairs": value("cappy_queue_pairs"),
        # what admission refuses on: set against the queue time the pairs then saw
        "expected_wait_s": value("cappy_queue_expected_wait_seconds"),
    }


async def scrape_all(client: httpx.AsyncClient) -> dict[Any, float]:
    """Every sample of the server's /metrics (empty when it cannot be read)."""
    try:
        return parse_metrics((await client.get("/metrics", timeout=5.0)).text)
    except httpx.HTTPError:
        return {}


async def server_limits(client: httpx.AsyncClient) -> dict[str, Any] | None:
    try:
        return dict((await client.get("/info", timeout=5.0)).json()["limits"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def smallest(workload: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The workload's requests with the fewest candidates, in order (the probe's)."""
    fewest = min(len(item["candidates"]) for item in workload)
    return [item for item in workload if len(item["candidates"]) == fewest]


def summary(answers: Sequence[Answer], seconds: float) -> dict[str, Any]:
    ok = [a for a in answers if a.status == 200]
    statuses = Counter(str(a.status) for a in answers)
    by_size: dict[int, list[Answer]] = defaultdict(list)
    for answer in answers:
        by_size[answer.candidates].append(answer)
    latencies = [a.latency * 1000 for a in ok]
    return {
        "sent": len(answers),
        "seconds": round(seconds, 2),
        "statuses": dict(sorted(statuses.items())),
        "ok_per_s": round(len(ok) / seconds, 2) if seconds else None,
        "pairs_per_s": round(sum(a.candidates for a in ok) / seconds, 1) if seconds else None,
        "latency_ms": {
            f"p{q}": None if (v := percentile(latencies, q)) is None else round(v, 1)
            for q in (50, 95, 99)
        },
        "refused_without_retry_after": sum(
            1 for a in answers if a.status == 429 and not a.retry_after
        ),
        "retry_after_s": sorted({a.retry_after for a in answers if a.retry_after}, key=float)[:20],
        "ok_share_by_candidates": {
            str(size): round(sum(1 for a in group if a.status == 200) / len(group), 3)
            for size, group in sorted(by_size.items())
        },
    }


def timeline(answers: Sequence[Answer], samples: Sequence[dict[str, Any]], seconds: float) -> list:
    rows = []
    for second in range(math.ceil(seconds)):
        sent = [a for a in answers if second <= a.sent_at < second + 1]
        ok = [a.latency * 1000 for a in sent if a.status == 200]
        sample = next((s for s in samples if second <= s["t"] < second + 1), {})
        rows.append(
            {
                "t": second,
                "sent": len(sent),
                "ok": len(ok),
                "refused": sum(1 for a in sent if a.status == 429),
                "other": sum(1 for a in sent if a.status not in (200, 429)),
                "p50_ms": None if (v := percentile(ok, 50)) is None else round(v, 1),
                "rss_mb": sample.get("rss_mb"),
                "queue_pairs": sample.get("queue_pairs"),
                "expected_wait_s": sample.get("expected_wait_s"),
            }
        )
    return rows


def recovery_seconds(answers: Sequence[Answer], threshold_s: float) -> float | None:
    """Seconds from the phase start until every later request was answered 200 in time; None
    if that never happened."""
    bad = [a.sent_at for a in answers if a.status != 200 or a.latency > threshold_s]
    if not bad:
        return 0.0
    last_bad = max(bad)
    later = [a for a in answers if a.sent_at > last_bad]
    return round(last_bad, 2) if later else None


async def scenario(url: str, workload: Sequence[dict[str, Any]], args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    # Idle connections are dropped by the client before uvicorn's 5 s keep-alive timeout closes
    # them from its side: otherwise a request sent on a connection the server is closing at that
    # instant fails in transport (status 0), which says nothing about the server under test.
    limits = httpx.Limits(
        max_connections=args.max_in_flight + 8, max_keepalive_connections=64, keepalive_expiry=2.0
    )
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        sampler = Sampler(client)
        before = await scrape(client)
        baseline, seconds = await closed_loop(client, workload, 1, args.baseline_seconds)
        result: dict[str, Any] = {"baseline": summary(baseline, seconds)}
        capacity, seconds = await closed_loop(
            client, workload, args.capacity_concurrency, args.capacity_seconds
        )
        result["capacity"] = summary(capacity, seconds)
        rate = result["capacity"]["ok_per_s"] or 1.0
        metrics_before = await scrape_all(client)
        probe = RetryProbe(
            client, smallest(workload), args.probe_interval, args.probe_poll, args.timeout
        )
        probe.start(time.perf_counter(), args.overload_seconds)
        flood, skipped = await open_loop(
            client,
            workload,
            args.factor * rate,
            args.overload_seconds,
            args.max_in_flight,
            rng,
            sampler,
        )
        await probe.wait()
        configured = (await server_limits(client)) or {}
        result["overload"] = {
            "offered_per_s": round(args.factor * rate, 2),
            "client_skipped": skipped,
            **summary(flood, args.overload_seconds),
            "server_queue_time": queue_time(
                metrics_before, await scrape_all(client), configured.get("max_queue_wait_s")
            ),
            "retry_probe": retry_summary(probe),
            "timeline": timeline(flood, sampler.samples, args.overload_seconds),
        }
        normal, skipped = await open_loop(
            client,
            workload,
            args.recovery_load * rate,
            args.recovery_seconds,
            args.max_in_flight,
            rng,
            sampler,
        )
        p95 = (result["baseline"]["latency_ms"]["p95"] or 500.0) / 1000
        threshold = max(0.5, args.recovered_latency_factor * p95)
        result["recovery"] = {
            "offered_per_s": round(args.recovery_load * rate, 2),
            "client_skipped": skipped,
            "recovered_latency_threshold_s": round(threshold, 3),
            "recovery_s": recovery_seconds(normal, threshold),
            **summary(normal, args.recovery_seconds),
            "timeline": timeline(normal, sampler.samples, args.recovery_seconds),
        }
        result["server_before"] = before
        result["server_after"] = await scrape(client)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.overload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server (loopback only)")
    target.add_argument(
        "--self-contained", action="store_true", help="start `cappy serve --model EXPORT`"
    )
    parser.add_argument("--export", help="export directory (--self-contained)")
    parser.add_argument(
        "--serve-arg", action="append", default=[], metavar="KEY=VALUE", help="CAPPY_KEY=VALUE"
    )
    parser.add_argument("--requests", default=str(DEFAULT_REQUESTS), help="workload JSONL")
    parser.add_argument("--baseline-seconds", type=float, default=10.0)
    parser.add_argument("--capacity-seconds", type=float, default=30.0)
    parser.add_argument("--capacity-concurrency", type=int, default=32)
    parser.add_argument("--factor", type=float, default=10.0, help="overload: x capacity")
    parser.add_argument("--overload-seconds", type=float, default=60.0)
    parser.add_argument("--recovery-load", type=float, default=0.5, help="after: x capacity")
    parser.add_argument("--recovery-seconds", type=float, default=30.0)
    parser.add_argument("--recovered-latency-factor", type=float, default=4.0)
    parser.add_argument(
        "--probe-interval", type=float, default=1.0, help="retry probe: seconds between requests"
    )
    parser.add_argument(
        "--probe-poll", type=float, default=0.25, help="retry probe: seconds between retries"
    )
    parser.add_argument("--max-in-flight", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workload = load_workload(args.requests)
    if args.self_contained:
        if not args.export:
            raise SystemExit("error: --self-contained needs --export")
        with running_server(args.export, args.serve_arg) as url:
            result = asyncio.run(scenario(url, workload, args))
    else:
        check_loopback(args.url)
        result = asyncio.run(scenario(args.url, workload, args))
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
